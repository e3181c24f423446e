"""ExpertDispatch -> the project's qmoe TensorRT plugin node (`trt.plugins::Qwen3MoE`, contract in
`qwen3_compile/kernels/trt_contract.py`): the sparse CUDA kernels of plugins/moe behind an IPluginV3.

The plugin takes the canonical inputs unchanged (hidden [N, H], raw router logits [N, E], gate_up [E, 2I, H],
down [E, H, I]) plus, for INT8 weight-only experts, one scale per expert and output row ([E, 2I], [E, H]).
It runs fp16/bf16 activations and shapes the kernels support (H % 128, I % 64, E <= 256, k <= 32); other
nodes are declined with that reason and a later rule (dense) takes them.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, QUANTIZED_EXPERT_DISPATCH
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

_ACT_TYPES = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


def _int8_source(view: GraphView, value: str) -> tuple[str, str] | None:
    """(int8 values, fp scales) behind `value` when it is a per-expert, per-row DequantizeLinear."""
    node = view.producers.get(value)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) != 2:
        return None
    values, scale = node.input
    if view.elem_type(values) != TensorProto.INT8 or view.elem_type(scale) is None:
        return None
    dims = view.initializers[values].dims
    attrs = view.attrs(node)
    if len(dims) != 3 or attrs.get("axis") != 2 or attrs.get("block_size") != dims[2]:
        return None
    return values, scale


class ExpertDispatchToQwen3MoePlugin(RewriteRule):
    name = "expert_dispatch_to_qwen3_moe_plugin"
    target_op = (DOMAIN, EXPERT_DISPATCH)
    # W8A8 experts are reported too: the user should see why they stayed dense
    target_ops = ((DOMAIN, EXPERT_DISPATCH), (DOMAIN, QUANTIZED_EXPERT_DISPATCH))

    def _weights(self, view: GraphView, node: onnx.NodeProto) -> tuple[list[str], int] | str:
        """(plugin weight inputs, activation type) or why the plugin cannot take this node."""
        gate_up, down = node.input[2:4]
        if gate_up in view.initializers and down in view.initializers:
            act = view.elem_type(gate_up)
            if act not in _ACT_TYPES or view.elem_type(down) != act:
                return "the plugin runs fp16/bf16 experts (export with --dtype fp16)"
            return [gate_up, down], act
        sources = [_int8_source(view, v) for v in (gate_up, down)]
        if None in sources:
            return "expert weights are neither fp16/bf16 initializers nor INT8 per-row DequantizeLinear"
        (q1, s1), (q2, s2) = sources
        act = view.elem_type(s1)  # DequantizeLinear's output type is its scale's
        if act not in _ACT_TYPES:
            return "INT8 experts dequantize to fp32 here; the plugin runs fp16/bf16 activations"
        return [q1, q2, s1, s2], act

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        from qwen3_compile.kernels import trt_contract as contract

        if (node.domain, node.op_type) == (self.target_op[0], QUANTIZED_EXPERT_DISPATCH):
            return (
                "W8A8 experts (QuantizedExpertDispatch): the plugin takes fp16/bf16 or INT8 weight-only "
                "experts, not quantized activations"
            )
        if (node.domain, node.op_type) != self.target_op:
            return "not an ExpertDispatch node"
        attrs = view.attrs(node)
        weights = self._weights(view, node)
        if isinstance(weights, str):
            return weights
        experts, two_inter, hidden = view.initializers[weights[0][0]].dims
        try:
            contract.MoeAttributes(int(attrs["top_k"]), bool(attrs["normalize"]), _text(attrs)).check()
            contract.check_shapes(experts, hidden, two_inter // 2, int(attrs["top_k"]))
        except ValueError as err:
            return str(err)
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        from qwen3_compile.kernels import trt_contract as contract

        attrs = view.attrs(node)
        weights, _ = self._weights(view, node)
        arrays = {}
        if len(weights) == 4:  # INT8: scales [E, rows, 1] -> [E, rows]
            for scale in weights[2:]:
                arrays[f"{scale}.rows"] = view.array(scale).reshape(view.initializers[scale].dims[0], -1)
            weights = [*weights[:2], *arrays]
        moe = contract.make_node(
            [node.input[0], node.input[1], *weights],
            node.output[0],
            contract.MoeAttributes(int(attrs["top_k"]), bool(attrs["normalize"]), _text(attrs)),
            name=node.name,
        )
        return Replacement([moe], arrays, {contract.NODE_DOMAIN: 1})


def _text(attrs: dict) -> str:
    value = attrs.get("activation", b"silu")
    return value.decode() if isinstance(value, bytes) else str(value)
