"""An asymmetric weight (AWQ, GPTQ with zero points) ==> a symmetric one TensorRT takes, plus a small exact
correction.

Imported AWQ and asymmetric GPTQ linears are `MatMul(x, DQ(u, s, z))`: unsigned values `u` (uint4/uint8) with
a zero point `z` per output column and group of g input rows (export/imported.py). TensorRT's
DequantizeLinear takes signed values and no zero point (TensorRT-RTX 1.7.1 rejects the uint4 initializer), so
the weight is split exactly, with `m` the unsigned type's midpoint (8 or 128):

    (u - z) * s  =  (u - m) * s  +  (m - z) * s

`u - m` is a signed INT4/INT8 value (in [-8, 7] / [-128, 127]: no clipping), so the first term is the
symmetric blocked DequantizeLinear TensorRT builds as weight-only INT4/INT8. The second term is constant over
each block of g input rows: `x @ it` = `b @ C`, where `b` [M, K/g] is x summed over each block (Reshape +
ReduceSum: no weight to read) and `C = (m - z) * s` is [K/g, N] in the scale's float type, as many numbers as
the scales. A desc_act weight (values stored with their rows sorted by group, a Gather putting them back)
gathers x into the same order before summing.

In exact arithmetic the result is the imported weight's product; in floating point it differs by the rounding
of one more sum (and, in fp16 graphs, of `C`), the same order as the DequantizeLinear's own rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

# unsigned value type -> (signed type, midpoint, numpy signed type)
_SIGNED = {
    TensorProto.UINT4: (TensorProto.INT4, 8, np.int8),
    TensorProto.UINT8: (TensorProto.INT8, 128, np.int8),
}
_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _source(view: GraphView, weight: str):
    """(DequantizeLinear, restore-order Gather or None) of an asymmetric 2-D weight, why this one cannot be
    rewritten, or None where `weight` is no DequantizeLinear-with-zero-point output (not this rule's)."""
    node = view.producers.get(weight)
    gather = None
    if node is not None and node.op_type == "Gather" and node.domain in ("", "ai.onnx"):
        gather, node = node, view.producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.input) < 3 or not node.input[2]:
        return None  # symmetric: nothing to do
    values, scale, zero = node.input
    if view.elem_type(values) not in _SIGNED or view.elem_type(zero) != view.elem_type(values):
        return f"'{values}' is not a uint4/uint8 initializer with a zero point of its type"
    if view.elem_type(scale) not in _FLOATS:
        return f"'{scale}' is not an fp32 or fp16 initializer"
    dims = list(view.initializers[values].dims)
    block = view.attrs(node).get("block_size", 0)
    if len(dims) != 2 or view.attrs(node).get("axis", 1) != 0 or block <= 0 or dims[0] % block:
        return f"'{values}' is not a 2-D [K, N] weight quantized per block along K"
    if gather is not None:
        if view.attrs(gather).get("axis", 0) != 0 or view.constant(gather.input[1]) is None:
            return f"'{gather.name}' is not a constant row order"
    return node, gather


class ZeroPointWeightsToSymmetric(RewriteRule):
    name = "zero_point_weights_to_symmetric"
    target_op = ("", "MatMul")

    def reports(self, view: GraphView, node: onnx.NodeProto) -> bool:
        # only MatMuls that read an asymmetric weight: every float MatMul would be listed otherwise
        return node.op_type == "MatMul" and len(node.input) == 2 and _source(view, node.input[1]) is not None

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return "not a MatMul"
        source = _source(view, node.input[1])
        if source is None:
            return "its weight is not dequantized with a zero point"
        return source if isinstance(source, str) else None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        dq, gather = _source(view, node.input[1])
        values, scale, zero = dq.input
        signed_type, mid, signed_np = _SIGNED[view.elem_type(values)]
        float_np = _FLOATS[view.elem_type(scale)]
        k, n = view.initializers[values].dims
        block = view.attrs(dq)["block_size"]
        base = values.removesuffix(".q")
        arrays: dict[str, np.ndarray] = {}
        signed, correction = base + ".q_signed", base + ".zero_correction"
        if signed not in view.initializers:  # a weight read by several MatMuls is converted once
            u = view.array(values).astype(np.int16)
            arrays[signed] = _typed((u - mid).astype(signed_np), signed_type)
            s = view.array(scale).astype(np.float32)
            z = view.array(zero).astype(np.float32)
            arrays[correction] = ((mid - z) * s).astype(float_np)  # [K/g, N]
        shapes = f"zero_point.blocks.{k}x{block}", "zero_point.sum_axis"
        if shapes[0] not in view.initializers:  # shared by every weight of the same K and g
            arrays[shapes[0]] = np.array([-1, k // block, block], dtype=np.int64)
        if shapes[1] not in view.initializers:
            arrays[shapes[1]] = np.array([2], dtype=np.int64)
        out, name = node.output[0], node.name
        # per MatMul: a weight read twice gets two (identical) DequantizeLinear nodes
        weight = out + ".weight"
        nodes = [
            helper.make_node(
                "DequantizeLinear",
                [signed, scale],
                [weight if gather is None else weight + ".sorted"],
                name=name + "/dequantize",
                axis=0,
                block_size=block,
            )
        ]
        x = node.input[0]
        if gather is not None:  # rows back in channel order; x into the sorted order for the block sums
            restore = gather.input[1]
            nodes.append(
                helper.make_node("Gather", [weight + ".sorted", restore], [weight], name=name + "/rows")
            )
            order = base + ".sorted_order"
            if order not in view.initializers:
                arrays[order] = np.argsort(view.constant(restore)).astype(np.int64)
            nodes.append(
                helper.make_node("Gather", [x, order], [out + ".x_sorted"], name=name + "/x", axis=-1)
            )
            x = out + ".x_sorted"
        # (x @ E) as x's blocks summed: [..., K] -> [M, K/g, g] -> [M, K/g]; then @ C and back to y's shape
        v = {s: f"{out}.{s}" for s in ("symmetric", "blocks", "block_sums", "shift", "shape", "shift_shaped")}
        nodes += [
            helper.make_node("MatMul", [node.input[0], weight], [v["symmetric"]], name=name),
            helper.make_node("Reshape", [x, shapes[0]], [v["blocks"]], name=name + "/blocks"),
            helper.make_node(
                "ReduceSum",
                [v["blocks"], shapes[1]],
                [v["block_sums"]],
                name=name + "/block_sums",
                keepdims=0,
            ),
            helper.make_node(
                "MatMul", [v["block_sums"], correction], [v["shift"]], name=name + "/zero_point"
            ),
            helper.make_node("Shape", [v["symmetric"]], [v["shape"]], name=name + "/shape"),
            helper.make_node("Reshape", [v["shift"], v["shape"]], [v["shift_shaped"]], name=name + "/shift"),
            helper.make_node("Add", [v["symmetric"], v["shift_shaped"]], [out], name=name + "/add"),
        ]
        return Replacement(nodes, arrays)


def _typed(values: np.ndarray, onnx_type: int) -> np.ndarray:
    """Signed values as the array type the external-data writer stores as `onnx_type` (INT4: ml_dtypes)."""
    if onnx_type == TensorProto.INT4:
        import ml_dtypes

        return values.astype(ml_dtypes.int4)
    return values


def has_zero_point_weights(model: onnx.ModelProto) -> tuple[bool, bool]:
    """(any 2-D asymmetric weight, any asymmetric weight of another rank: stacked MoE experts) in the graph;
    reads no external data."""
    dims = {t.name: len(t.dims) for t in model.graph.initializer}
    ranks = [
        dims.get(n.input[0])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2]
    ]
    return any(r == 2 for r in ranks), any(r != 2 for r in ranks)
