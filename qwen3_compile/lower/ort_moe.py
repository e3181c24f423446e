"""ExpertDispatch -> ONNX Runtime's com.microsoft::MoE (fp32 experts; ORT's CPU kernel is fp32-only).

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

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if (node.domain, node.op_type) != self.target_op:
            return "not an ExpertDispatch node"
        attrs = view.attrs(node)
        if attrs.get("activation", b"silu") not in (b"silu", "silu"):
            return f"activation {attrs.get('activation')!r} has no ORT MoE equivalent"
        for name in node.input[2:4]:
            if name not in view.initializers:
                return f"expert weights '{name}' are not initializers"
            if view.elem_type(name) != TensorProto.FLOAT:
                return "ORT's CPU MoE kernel runs fp32 experts only (export with --dtype fp32)"
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        hidden, router_logits, gate_up, down = node.input
        attrs = view.attrs(node)
        fc1_name = gate_up + ".interleaved"
        moe = onnx.helper.make_node(
            "MoE",
            [hidden, router_logits, fc1_name, "", down],
            list(node.output),
            name=node.name,
            domain=ORT_DOMAIN,
            **swiglu_moe_attributes(attrs),
        )
        return Replacement([moe], {fc1_name: interleave_gate_up(view.array(gate_up))}, {ORT_DOMAIN: 1})
