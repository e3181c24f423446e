"""ExpertDispatch -> the project's qmoe TensorRT plugin node (`trt.plugins::Qwen3MoE`, contract in
`qwen3_compile/kernels/trt_contract.py`): the sparse CUDA kernels of plugins/moe behind an IPluginV3.

The plugin takes the canonical inputs unchanged (hidden [N, H], raw router logits [N, E], gate_up [E, 2I, H],
down [E, H, I]) plus, for weight-only quantized experts (lower/quantized_experts.py), the quantized values
instead of the dequantized weights, and their scales:

- INT8: one scale per expert and output row, passed as [E, 2I] and [E, H] (the DequantizeLinear scales
  [E, rows, 1] reshaped: new initializers, the int8 values are the model's own);
- INT4: the INT4 initializers themselves (TensorRT's parser imports them as kINT4 constants holding ONNX's
  packed bytes, which the kernels read as they are) and the per-group scales [E, 2I, H/G], [E, H, I/G].
  Built with TensorRT-RTX 1.7.1 on the CPU (tests/kernels/test_trt_python_plugin.py): the parser feeds the
  plugin kINT4 inputs and the engine builds; no TensorRT runtime here has executed one.

It runs fp16/bf16 activations (fp16 scales for quantized experts) and shapes the kernels support (H % 128,
I % 64, E <= 256, k <= 32, INT4 groups of 32/64/128); other nodes are declined with that reason and a later
rule (dense) takes them.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, QUANTIZED_EXPERT_DISPATCH
from qwen3_compile.lower.quantized_experts import (
    QuantizedExperts,
    activation,
    kernel_limits,
    quantized_experts,
)
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

_ACT_TYPES = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


class ExpertDispatchToQwen3MoePlugin(RewriteRule):
    name = "expert_dispatch_to_qwen3_moe_plugin"
    target_op = (DOMAIN, EXPERT_DISPATCH)
    # W8A8 experts are reported too: the user should see why they stayed dense
    target_ops = ((DOMAIN, EXPERT_DISPATCH), (DOMAIN, QUANTIZED_EXPERT_DISPATCH))

    def _weights(
        self, view: GraphView, node: onnx.NodeProto
    ) -> tuple[list[str], QuantizedExperts | None] | str:
        """(plugin weight inputs, the quantized experts or None for float ones) or why the plugin cannot
        take this node."""
        gate_up, down = node.input[2:4]
        if gate_up in view.initializers and down in view.initializers:
            act = view.elem_type(gate_up)
            if act not in _ACT_TYPES or view.elem_type(down) != act:
                return "the plugin runs fp16/bf16 experts (export with --dtype fp16)"
            return [gate_up, down], None
        experts = quantized_experts(view, node)
        if isinstance(experts, str):
            return experts
        return [experts.gate_up, experts.down, experts.gate_up_scale, experts.down_scale], experts

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        from qwen3_compile.kernels import trt_contract as contract

        if (node.domain, node.op_type) == (self.target_op[0], QUANTIZED_EXPERT_DISPATCH):
            return (
                "W8A8 experts (QuantizedExpertDispatch): the plugin takes fp16/bf16 or INT8/INT4 weight-only "
                "experts, not quantized activations"
            )
        if (node.domain, node.op_type) != self.target_op:
            return "not an ExpertDispatch node"
        attrs = view.attrs(node)
        weights = self._weights(view, node)
        if isinstance(weights, str):
            return weights
        if weights[1] is not None:
            why = kernel_limits(weights[1], int(attrs["top_k"]))
            if why:
                return why
        experts, two_inter, hidden = view.initializers[weights[0][0]].dims
        try:
            contract.MoeAttributes(int(attrs["top_k"]), bool(attrs["normalize"]), activation(attrs)).check()
            contract.check_shapes(experts, hidden, two_inter // 2, int(attrs["top_k"]))
        except ValueError as err:
            return str(err)
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        from qwen3_compile.kernels import trt_contract as contract

        attrs = view.attrs(node)
        weights, quantized = self._weights(view, node)
        arrays = {}
        if quantized is not None and quantized.kind == "int8":  # scales [E, rows, 1] -> [E, rows]
            for scale in weights[2:]:
                arrays[f"{scale}.rows"] = view.array(scale).reshape(view.initializers[scale].dims[0], -1)
            weights = [*weights[:2], *arrays]
        moe = contract.make_node(
            [node.input[0], node.input[1], *weights],
            node.output[0],
            contract.MoeAttributes(int(attrs["top_k"]), bool(attrs["normalize"]), activation(attrs)),
            name=node.name,
        )
        return Replacement([moe], arrays, {contract.NODE_DOMAIN: 1})
