"""One imported linear weight, unpacked: integer (or E4M3) values, scales and zero points per block of
input channels, in torch's layout (rows are output channels). From it come the exact float weight (the
PyTorch reference) and the DequantizeLinear inputs the graph holds (`onnx_arrays`).

Exactness: integer formats dequantize as (q - z) * s, where q - z is a small integer (exact in fp32) and
s an fp16/bf16/fp32 scale (exact in fp32), so each weight is one fp32 rounding of the product, the same
one ONNX's DequantizeLinear makes. E4M3 values times their fp32 block scale: likewise one rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _onnx_int(bits: int, signed: bool) -> type:
    """The numpy type of a DequantizeLinear input. ml_dtypes is imported here, not at module level: it
    takes ~0.6 s, and `inspect` reaches this module through the checkpoint config."""
    if bits == 8:
        return np.int8 if signed else np.uint8
    import ml_dtypes

    return ml_dtypes.int4 if signed else ml_dtypes.uint4


class NotRepresentable(Exception):
    """The weight dequantizes exactly but has no exact DequantizeLinear form; the message says why."""


@dataclass
class UnpackedWeight:
    """`values` [out, in] (int16 for integer formats, float8_e4m3fn for fp8); `scale` float32 [out, blocks];
    `zero` int16 [out, blocks] or None (fp8); `group` input channels per block (the last may be short);
    `g_idx` [in]: the block of each input channel when it is not `i // group` (GPTQ desc_act)."""

    values: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    group: int
    bits: int
    g_idx: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def block_of_input(self) -> np.ndarray:
        if self.g_idx is not None:
            return self.g_idx.astype(np.int64)
        return np.arange(self.shape[1]) // self.group

    def dequantize(self) -> np.ndarray:
        """The exact float32 weight [out, in]."""
        blocks = self.block_of_input()
        scale = self.scale[:, blocks]
        if self.zero is None:
            return self.values.astype(np.float32) * scale
        return (self.values.astype(np.int32) - self.zero[:, blocks]).astype(np.float32) * scale


@dataclass
class QdqArrays:
    """DequantizeLinear's inputs in torch layout ([out, in] values, [out, blocks] scale and zero point),
    blocked along the input axis; `order` [in] (or None): the input channel each value column holds, so
    the dequantized weight's columns must be put back with `argsort(order)`."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    block: int
    order: np.ndarray | None
    dtype: str  # int4, uint4, int8, uint8, fp8


def onnx_arrays(w: UnpackedWeight) -> QdqArrays:
    """The blocked DequantizeLinear form of `w`, or NotRepresentable."""
    order, values, zero = None, w.values, w.zero
    if w.g_idx is not None:
        out_blocks = w.scale.shape[1]
        order = np.argsort(w.g_idx, kind="stable")
        sorted_blocks = w.g_idx[order]
        if (
            not np.array_equal(sorted_blocks, np.arange(w.shape[1]) // w.group)
            or out_blocks * w.group < w.shape[1]
        ):
            raise NotRepresentable(
                "its g_idx does not give every group exactly group_size input channels, so no blocked "
                "DequantizeLinear holds it"
            )
        if np.array_equal(order, np.arange(w.shape[1])):
            order = None
        else:
            values = values[:, order]
    if w.zero is None:  # fp8
        return QdqArrays(values, w.scale, None, w.group, order, "fp8")
    mid = 1 << (w.bits - 1)
    if np.all(zero == mid):  # symmetric: signed values, no zero point (TensorRT's form)
        return QdqArrays(
            (values - mid).astype(_onnx_int(w.bits, True)), w.scale, None, w.group, order, f"int{w.bits}"
        )
    top = (1 << w.bits) - 1
    if zero.min() < 0 or zero.max() > top:
        raise NotRepresentable(
            f"a zero point of {int(zero.max()) if zero.max() > top else int(zero.min())} does not fit the "
            f"{w.bits}-bit unsigned zero point DequantizeLinear takes"
        )
    kind = _onnx_int(w.bits, False)
    return QdqArrays(values.astype(kind), w.scale, zero.astype(kind), w.group, order, f"uint{w.bits}")
