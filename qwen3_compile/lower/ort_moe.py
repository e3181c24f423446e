"""ExpertDispatch -> ONNX Runtime's com.microsoft::MoE.

fp32 experts always (ORT's CPU kernel is fp32-only). fp16 experts only when the user asked for this lowering
(`lower --for ort --moe-lowering ort-moe`, rule option `half_experts`): ORT's CUDA kernel runs them, its CPU
provider cannot, so the default keeps ExpertDispatch there. MoE takes the router input in the experts' type,
so an fp16 graph's fp32 router logits are cast to fp16 in front of it: a routing decision whose top-k margin
is below fp16's resolution can differ from the canonical graph's (which softmaxes fp32 logits).

ORT's MoE takes the raw router logits and softmaxes them itself; with `swiglu_fusion=1` its fc1 holds
gate and up rows interleaved (g0, u0, g1, u1, ...), and its SwiGLU is
`G * sigmoid(alpha * G) * (L + beta)`: alpha=1, beta=0 and no clamp give Qwen3's silu(gate) * up.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

ORT_DOMAIN = "com.microsoft"


def interleave_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[E, 2I, H] with gate rows then up rows -> rows interleaved g0, u0, g1, u1, ..."""
    experts, rows, hidden = gate_up.shape
    gate, up = gate_up[:, : rows // 2], gate_up[:, rows // 2 :]
    return np.stack([gate, up], axis=2).reshape(experts, rows, hidden)


def swiglu_moe_attributes(dispatch_attrs: dict) -> dict:
    """ORT MoE/QMoE attributes for an ExpertDispatch: Qwen3's SwiGLU needs alpha=1, beta=0, no clamp,
    with gate/up rows interleaved in fc1."""
    return dict(
        k=int(dispatch_attrs["top_k"]),
        normalize_routing_weights=int(dispatch_attrs["normalize"]),
        activation_type="swiglu",
        swiglu_fusion=1,
        activation_alpha=1.0,
        activation_beta=0.0,
        use_sparse_mixer=0,
    )


class ExpertDispatchToOrtMoE(RewriteRule):
    name = "expert_dispatch_to_ort_moe"
    target_op = (DOMAIN, EXPERT_DISPATCH)
    options = ("half_experts",)

    def __init__(self, half_experts: bool = False) -> None:
        self.half_experts = half_experts

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if (node.domain, node.op_type) != self.target_op:
            return "not an ExpertDispatch node"
        attrs = view.attrs(node)
        if attrs.get("activation", b"silu") not in (b"silu", "silu"):
            return f"activation {attrs.get('activation')!r} has no ORT MoE equivalent"
        for name in node.input[2:4]:
            if name not in view.initializers:
                return f"expert weights '{name}' are not initializers"
            kind = view.elem_type(name)
            if kind == TensorProto.FLOAT16 and not self.half_experts:
                return (
                    "ORT's CPU MoE kernel runs fp32 experts only (export with --dtype fp32, or ask for "
                    "--moe-lowering ort-moe: fp16 experts for ORT's CUDA provider)"
                )
            if kind not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                return "ORT's MoE lowering takes fp32 experts (CPU, CUDA) or fp16 experts (CUDA)"
        if view.elem_type(node.input[2]) != view.elem_type(node.input[3]):
            return "gate_up and down experts differ in type"
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        hidden, router_logits, gate_up, down = node.input
        attrs = view.attrs(node)
        fc1_name = gate_up + ".interleaved"
        nodes = []
        expert_type = view.elem_type(gate_up)
        if expert_type != TensorProto.FLOAT:  # fp16 experts: the router logits (fp32 in our exports) to fp16
            cast = onnx.helper.make_node(
                "Cast",
                [router_logits],
                [router_logits + "/as_expert_type"],
                name=node.name + "/router_cast",
                to=expert_type,
            )
            nodes.append(cast)
            router_logits = cast.output[0]
        moe = onnx.helper.make_node(
            "MoE",
            [hidden, router_logits, fc1_name, "", down],
            list(node.output),
            name=node.name,
            domain=ORT_DOMAIN,
            **swiglu_moe_attributes(attrs),
        )
        return Replacement(
            [*nodes, moe], {fc1_name: interleave_gate_up(view.array(gate_up))}, {ORT_DOMAIN: 1}
        )
