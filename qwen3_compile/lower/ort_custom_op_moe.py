"""DequantizeLinear -> ExpertDispatch over weight-only quantized experts (INT8 per row, INT4 per group)
==> one `qwen3_compile::WeightOnlyExpertDispatch` node that the ORT custom-op library (libqmoe_ort) claims.

Without this rule ONNX Runtime would run the canonical graph's two DequantizeLinear nodes on every call
(all experts of the layer dequantized, 128 of them for Qwen3-30B-A3B, to feed 8 per token) and hand the
library float weights. The rewritten node takes the quantized initializers and their scales themselves:

    WeightOnlyExpertDispatch <top_k, normalize, activation, gate_up_block_size, down_block_size>
        (hidden [N, H], router_logits [N, E],
         gate_up_quantized [E, 2I, H], down_quantized [E, H, I],      int8, or int4 (2 a byte, low nibble 1st)
         gate_up_scale [E, 2I, H / B1], down_scale [E, H, I / B2])     fp16 (the library also takes fp32)
        -> output [N, H]

INT8: B1 = H, B2 = I (one scale per expert and output row, [E, rows, 1]); INT4: B1 = B2 = G, the group
size. These are exactly the DequantizeLinear inputs of the canonical graph (the same initializers, not
copies), and the library passes their device buffers to `qmoe_forward` (QMOE_I8 / QMOE_I4) on every
call: the kernels read the ONNX layouts as they are, so nothing is packed or dequantized per call or at
session creation.

Why a separately named op, not ExpertDispatch with six inputs (as the TensorRT plugin node has): the
node must stay a valid ONNX graph whose reference semantics any runtime can run. ExpertDispatch's
function body has four inputs and float weights; a six-input call to it is not that function. The new
op has its own function body (graphs/weight_only_expert_dispatch.onnxtxt), added to the model: the two
canonical DequantizeLinear nodes (`axis=2`, `block_size` from the attributes), a CastLike to the hidden
dtype (the identity for the fp16 scales this rule emits), then ExpertDispatch's body. So without the
library ORT inlines it and computes what the canonical graph computes (tested on ORT CPU), and onnx's
checker accepts the model. The block sizes are attributes because DequantizeLinear needs them as
attributes; the library derives G from the shapes and refuses a node whose attributes disagree.

Declined (the node keeps DequantizeLinear -> ExpertDispatch, which the reference body runs; with the
library registered ORT then runs the DequantizeLinear nodes and the library's float ExpertDispatch, or
refuses the shapes): experts the kernels cannot take: fp32 (or bf16) scales, INT4 groups other than
32/64/128 or different for gate_up and down, shapes outside the kernels' limits (H % 128, I % 64,
E <= 256, top_k <= 32; tiny-moe's 64-wide layers), zero points, and float experts (not this rule's:
the library claims their ExpertDispatch as it is).
"""

from __future__ import annotations

import onnx
from onnx import helper

from qwen3_compile.custom_ops import (
    DOMAIN,
    DOMAIN_VERSION,
    EXPERT_DISPATCH,
    WEIGHT_ONLY_EXPERT_DISPATCH,
    function,
)
from qwen3_compile.lower.quantized_experts import activation, is_dequantized, kernel_limits, quantized_experts
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule


class QuantizedExpertsToWeightOnlyDispatch(RewriteRule):
    name = "quantized_experts_to_weight_only_dispatch"
    target_op = (DOMAIN, EXPERT_DISPATCH)

    def reports(self, view: GraphView, node: onnx.NodeProto) -> bool:
        # float experts stay ExpertDispatch on purpose (the library claims that node): not a decline
        return (node.domain, node.op_type) == self.target_op and any(
            is_dequantized(view, value) for value in node.input[2:4]
        )

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        from qwen3_compile.kernels import trt_contract as contract

        if (node.domain, node.op_type) != self.target_op:
            return "not an ExpertDispatch node"
        experts = quantized_experts(view, node)
        if isinstance(experts, str):
            return experts
        attrs = view.attrs(node)
        try:
            contract.MoeAttributes(
                int(attrs["top_k"]), bool(attrs.get("normalize", 1)), activation(attrs)
            ).check()
        except ValueError as err:
            return str(err).removeprefix(f"{contract.PLUGIN_NAME}: ")
        return kernel_limits(experts, int(attrs["top_k"]))

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        experts = quantized_experts(view, node)
        attrs = view.attrs(node)
        dispatch = helper.make_node(
            WEIGHT_ONLY_EXPERT_DISPATCH,
            [
                *node.input[:2],
                experts.gate_up,
                experts.down,
                experts.gate_up_scale,
                experts.down_scale,
            ],
            list(node.output),
            name=node.name,
            domain=DOMAIN,
            top_k=int(attrs["top_k"]),
            normalize=int(attrs.get("normalize", 1)),
            activation=activation(attrs),
            gate_up_block_size=experts.gate_up_block,
            down_block_size=experts.down_block,
        )
        opset = next(o.version for o in view.model.opset_import if o.domain in ("", "ai.onnx"))
        return Replacement(
            [dispatch],
            opsets={DOMAIN: DOMAIN_VERSION},
            functions=[function(WEIGHT_ONLY_EXPERT_DISPATCH, opset)],
        )
