"""ExpertDispatch over INT8-dequantized experts -> ONNX Runtime's com.microsoft::QMoE (8-bit weights).

The canonical quantized graph feeds ExpertDispatch from `DequantizeLinear(int8 [E, rows, cols], scale
[E, rows, 1], axis=2, block_size=cols)`. QMoE takes the INT8 values as uint8 with an implicit zero point
of 128 (measured: q + 128 matches the dequantized MoE to 2e-6; the raw int8 bit pattern does not) and
one fp32 scale per expert and output row; fc1 rows interleaved gate/up as for MoE.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH
from qwen3_compile.lower.ort_moe import ORT_DOMAIN, interleave_gate_up, swiglu_moe_attributes
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule


def _blocked_int8_source(view: GraphView, value: str) -> tuple[str, str] | str:
    """(int8 initializer, scale initializer) behind `value`, or why not."""
    node = view.producers.get(value)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) != 2:
        return f"'{value}' is not a symmetric DequantizeLinear output"
    values, scale = node.input
    if view.elem_type(values) != TensorProto.INT8 or view.elem_type(scale) != TensorProto.FLOAT:
        return f"'{values}' is not INT8 with fp32 scales"
    dims = view.initializers[values].dims
    attrs = view.attrs(node)
    if len(dims) != 3 or attrs.get("axis") != 2 or attrs.get("block_size") != dims[2]:
        return f"'{values}' is not quantized per expert and output row"
    return values, scale


def _as_uint8(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.int16) + 128).astype(np.uint8)


class QuantizedExpertDispatchToOrtQMoE(RewriteRule):
    name = "quantized_expert_dispatch_to_ort_qmoe"
    target_op = (DOMAIN, EXPERT_DISPATCH)

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        why = not_a_silu_dispatch(view, node)
        if why:
            return why
        for value in node.input[2:4]:
            source = _blocked_int8_source(view, value)
            if isinstance(source, str):
                return source
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        (q1, s1), (q2, s2) = (_blocked_int8_source(view, v) for v in node.input[2:4])
        experts = view.initializers[q1].dims[0]
        arrays = {
            q1 + ".qmoe": _as_uint8(interleave_gate_up(view.array(q1))),
            s1 + ".qmoe": interleave_gate_up(view.array(s1)).reshape(experts, -1),
            q2 + ".qmoe": _as_uint8(view.array(q2)),
            s2 + ".qmoe": view.array(s2).reshape(experts, -1),
        }
        return Replacement([qmoe_node(view, node, list(arrays), bits=8)], arrays, {ORT_DOMAIN: 1})


def not_a_silu_dispatch(view: GraphView, node: onnx.NodeProto) -> str | None:
    """Why `node` is not an ExpertDispatch that QMoE's SwiGLU can take (None: it is)."""
    if (node.domain, node.op_type) != (DOMAIN, EXPERT_DISPATCH):
        return "not an ExpertDispatch node"
    if view.attrs(node).get("activation", b"silu") not in (b"silu", "silu"):
        return "activation has no QMoE equivalent"
    return None


def qmoe_node(
    view: GraphView,
    dispatch: onnx.NodeProto,
    weights: list[str],
    bits: int,
    zero_points: list[str] | None = None,
    **extra,
):
    """The QMoE node replacing `dispatch`: `weights` = fc1 values, fc1 scales, fc2 values, fc2 scales;
    `zero_points` = fc1's and fc2's (inputs 11 and 12), when the weights have them."""
    fc1, fc1_scales, fc2, fc2_scales = weights
    inputs = [*dispatch.input[:2], fc1, fc1_scales, "", fc2, fc2_scales]
    if zero_points:
        inputs += ["", "", "", "", *zero_points]  # fc2 bias, fc3 weights / scales / bias unused
    return helper.make_node(
        "QMoE",
        inputs,
        list(dispatch.output),
        name=dispatch.name,
        domain=ORT_DOMAIN,
        expert_weight_bits=bits,
        **extra,
        **swiglu_moe_attributes(view.attrs(dispatch)),
    )
