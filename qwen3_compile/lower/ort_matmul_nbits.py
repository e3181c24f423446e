"""INT4 weight-only DequantizeLinear -> MatMul  ==>  ONNX Runtime's com.microsoft::MatMulNBits (4 bits).

The canonical INT4 graph holds `DequantizeLinear(int4 [K, N], scale [K / g, N], axis=0, block_size=g)`
feeding `MatMul(x, W)` (quantize/int4.py). MatMulNBits takes the same numbers in its own layout:

- B: uint8 `[N, K / g, g / 2]`, each output column's K values in order, two a byte, the first in the low
  nibble, stored unsigned with MatMulNBits' default 4-bit zero point 8 (no zero-point input): our
  symmetric values q in [-7, 7] become q + 8. Dequantized, (q + 8 - 8) * scale is the canonical q * scale.
- scales: `[N, K / g]` (the canonical scales transposed), in the activations' float type.
- attributes K, N, bits=4, block_size=g (the recipe's group size; MatMulNBits takes powers of two >= 16,
  which the recipe decoder already demands).
- accuracy_level: 1 (fp32) for fp32 activations, 2 (fp16) for fp16 ones: the activations are never
  quantized. Level 4 would let ORT quantize them to int8 per block (measured on ORT 1.32 CPU, 1024x3072:
  relative error 6e-3 against 1e-6 at levels 0/1): a W4A8 computation a weight-only recipe does not
  describe (backends/onnxruntime/settings.py, the same lesson for ORT's own QDQ fusion).

Imported asymmetric INT4 linears (AWQ, GPTQ with zero points: `DequantizeLinear(uint4, scale, uint4 zero
point)`) take MatMulNBits' optional zero_points input: B holds the stored values as they are (no + 8) and
zero_points is uint8 `[N, ceil(K / g / 2)]`, each column's block zero points two a byte, low nibble first.

INT8 weight-only DQ -> MatMul is deliberately not lowered to MatMulNBits(bits=8): measured on ORT 1.32 CPU,
its fp32-activation path is exact but about 1.5 ms for a 1024x512 GEMV (numpy's fp32 1024x3072 GEMV takes
1.1 ms): MLAS has no fp32 8-bit kernel and dequantizes on every call; only accuracy level 4 (int8
activations) is fast. ORT 1.23.2 returned NaN for 8 bits with block_size 1024 (one block per column).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qwen3_compile.lower.ort_moe import ORT_DOMAIN
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

# MatMulNBits accuracy level per activation type: never 4 (int8 activations)
ACCURACY_LEVEL = {TensorProto.FLOAT: 1, TensorProto.FLOAT16: 2}
INT4_ZERO_POINT = 8  # MatMulNBits' and QMoE's implicit 4-bit zero point


def unsigned_values(view: GraphView, values: str, zero: str | None) -> np.ndarray:
    """An INT4 weight's values in [0, 15] (uint8), as MatMulNBits and QMoE read them: stored UINT4 as it is
    (its zero points given beside), symmetric INT4 + 8 (their implicit 4-bit zero point)."""
    q = view.array(values).astype(np.int8)
    return (q if zero is not None else q + INT4_ZERO_POINT).astype(np.uint8)


def blocked_int4_source(view: GraphView, value: str, axis: int) -> tuple[str, str, int] | str:
    """(INT4 initializer, scale initializer, block size) of the symmetric blocked DequantizeLinear that
    produces `value` along `axis` (the input axis), or why not."""
    node = view.producers.get(value)
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return f"'{value}' is not a DequantizeLinear output"
    if len(node.input) > 2 and node.input[2]:
        return f"'{node.name}' has a zero point (the canonical INT4 form is symmetric)"
    values, scale = node.input[:2]
    if view.elem_type(values) != TensorProto.INT4:
        return f"'{values}' is not an INT4 initializer"
    if view.elem_type(scale) not in ACCURACY_LEVEL:
        return f"'{scale}' is not an fp32 or fp16 initializer"
    attrs = view.attrs(node)
    block = attrs.get("block_size", 0)
    dims = view.initializers[values].dims
    if attrs.get("axis", 1) != axis or block < 16 or block & (block - 1) or dims[axis] % block:
        return f"'{values}' is not quantized per block of a power-of-two >= 16 along axis {axis}"
    return values, scale, block


def uint4_zero_point_source(view: GraphView, value: str, axis: int = 0) -> tuple[str, str, int, str] | str:
    """(UINT4 initializer, scale, block size, UINT4 zero point) of the asymmetric blocked DequantizeLinear
    along `axis`, the input axis, that produces `value` (an imported AWQ or GPTQ linear: axis 0 of a 2-D
    [K, N] weight; stacked experts: axis 2 of [E, rows, K]), or why not."""
    node = view.producers.get(value)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3 or not node.input[2]:
        return f"'{value}' is not a DequantizeLinear output with a zero point"
    values, scale, zero = node.input
    if view.elem_type(values) != TensorProto.UINT4 or view.elem_type(zero) != TensorProto.UINT4:
        return f"'{values}' is not a UINT4 initializer with a UINT4 zero point"
    if view.elem_type(scale) not in ACCURACY_LEVEL:
        return f"'{scale}' is not an fp32 or fp16 initializer"
    block = view.attrs(node).get("block_size", 0)
    dims = view.initializers[values].dims
    rank = 2 if axis == 0 else 3
    if len(dims) != rank or view.attrs(node).get("axis", 1) != axis or block < 16 or block & (block - 1):
        return f"'{values}' is not {rank}-D, quantized per block of a power-of-two >= 16 along axis {axis}"
    if dims[axis] % block:
        return f"'{values}' has {dims[axis]} inputs, not a whole number of blocks of {block}"
    return values, scale, block, zero


def int4_source(view: GraphView, value: str, axis: int) -> tuple[str, str, int, str | None] | str:
    """(values, scale, block size, zero point or None) of the INT4 weight behind `value`: the canonical
    symmetric form, or an imported asymmetric UINT4 one (its zero point named); or why neither."""
    symmetric = blocked_int4_source(view, value, axis)
    if not isinstance(symmetric, str):
        return (*symmetric, None)
    node = view.producers.get(value)
    if node is not None and len(node.input) > 2 and node.input[2]:
        return uint4_zero_point_source(view, value, axis)
    return symmetric


def is_int4_dequantized(view: GraphView, value: str) -> bool:
    """Whether `value` is a DequantizeLinear output of INT4 or UINT4 values (a candidate, matching or not)."""
    producer = view.producers.get(value)
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and view.elem_type(producer.input[0]) in (TensorProto.INT4, TensorProto.UINT4)
    )


class Int4MatMulToMatMulNBits(RewriteRule):
    name = "int4_matmul_to_matmul_nbits"
    target_op = ("", "MatMul")

    def reports(self, view: GraphView, node: onnx.NodeProto) -> bool:
        # every float MatMul (attention) would otherwise be listed as declined
        return node.op_type == "MatMul" and len(node.input) == 2 and is_int4_dequantized(view, node.input[1])

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            return "not a MatMul"
        source = int4_source(view, node.input[1], axis=0)
        if isinstance(source, str):
            return source
        if len(view.initializers[source[0]].dims) != 2:
            return f"'{source[0]}' is not a 2-D [K, N] weight"
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        values, scale, block, zero = int4_source(view, node.input[1], axis=0)
        k, n = view.initializers[values].dims
        base = values.removesuffix(".q")
        arrays = {}
        inputs = [node.input[0], base + ".nbits", base + ".nbits_scale"]
        if base + ".nbits" not in view.initializers:  # a weight read by several MatMuls is packed once
            u = unsigned_values(view, values, zero)  # [K, N]
            arrays[base + ".nbits"] = pack_nibbles(np.ascontiguousarray(u.T)).reshape(
                n, k // block, block // 2
            )
            arrays[base + ".nbits_scale"] = np.ascontiguousarray(view.array(scale).T)  # [N, K / g]
            if zero is not None:  # [N, ceil(K / g / 2)]: each column's block zero points, two a byte
                arrays[base + ".nbits_zero_point"] = pack_nibbles(view.array(zero).astype(np.int8).T)
        if zero is not None:
            inputs.append(base + ".nbits_zero_point")
        matmul = helper.make_node(
            "MatMulNBits",
            inputs,
            list(node.output),
            name=node.name,
            domain=ORT_DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=block,
            accuracy_level=ACCURACY_LEVEL[view.elem_type(scale)],
        )
        return Replacement([matmul], arrays, {ORT_DOMAIN: 1})


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Values in [0, 15] `[..., K]` -> uint8 `[..., ceil(K / 2)]`, two a byte, the first in the low nibble
    (an odd count padded with a zero high nibble)."""
    u = np.asarray(u).astype(np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), np.uint8)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
