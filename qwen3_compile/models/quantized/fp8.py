"""Qwen's FP8 checkpoints (`quant_method: fp8`, the fine-grained block format transformers reads).

Per quantized linear: `<module>.weight` E4M3 [out, in] and `<module>.weight_scale_inv` [ceil(out / R),
ceil(in / C)] for blocks of R x C (128 x 128). Despite its name the stored scale multiplies: the float
weight is `weight[i, j] * weight_scale_inv[i // R, j // C]`; edge blocks may be short. Per row, that is a
scale per block of C input channels: a blocked DequantizeLinear along the input axis with the block
scale repeated over its R rows is exact.
"""

from __future__ import annotations

import numpy as np

from qwen3_compile.models.quantized.config import QuantFormat
from qwen3_compile.models.quantized.weight import UnpackedWeight

SCALE_DTYPES = ("F32", "BF16", "F16")


def stored(
    prefix: str, fmt: QuantFormat, out: int, inp: int
) -> dict[str, tuple[str, tuple[str, ...], tuple]]:
    """role -> (tensor name, allowed dtypes, shape)."""
    rows, cols = -(-out // fmt.block_rows), -(-inp // fmt.group_size)
    return {
        "weight": (f"{prefix}.weight", ("F8_E4M3",), (out, inp)),
        "scale": (f"{prefix}.weight_scale_inv", SCALE_DTYPES, (rows, cols)),
    }


def marker(prefix: str) -> str:
    """The tensor whose presence says the module is quantized."""
    return f"{prefix}.weight_scale_inv"


def unpack(fmt: QuantFormat, arrays: dict[str, np.ndarray], refuse) -> UnpackedWeight:
    values = arrays["weight"]
    if np.isnan(values.astype(np.float32)).any():
        raise refuse("weight", "holds E4M3 NaN values.")
    scale = arrays["scale"].astype(np.float32)
    rows = np.repeat(scale, fmt.block_rows, axis=0)[: values.shape[0]]  # [out, blocks]
    return UnpackedWeight(values, np.ascontiguousarray(rows), None, fmt.group_size, 8)


def check_shape(fmt: QuantFormat, out: int, inp: int) -> str | None:
    return None  # edge blocks may be short
