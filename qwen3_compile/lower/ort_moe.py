"""ExpertDispatch -> ONNX Runtime's com.microsoft::MoE (fp32 experts; ORT's CPU kernel is fp32-only).

ORT's MoE takes the raw router logits and softmaxes them itself; with `swiglu_fusion=1` its fc1 holds
gate and up rows interleaved (g0, u0, g1, u1, ...), and its SwiGLU is
`G * sigmoid(alpha * G) * (L + beta)`: alpha=1, beta=0 and no clamp give Qwen3's silu(gate) * up.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

ORT_DOMAIN = "com.microsoft"


def interleave_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[E, 2I, H] with gate rows then up rows -> rows interleaved g0, u0, g1, u1, ..."""
    experts, rows, hidden = gate_up.shape
    gate, up = gate_up[:, : rows // 2], gate_up[:, rows // 2 :]
    return np.stack([gate, up], axis=2).reshape(experts, rows, hidden)


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
        top_k, normalize = int(attrs["top_k"]), int(attrs["normalize"])
        experts, rows, hidden_size = view.initializers[gate_up].dims
        fc1 = gate_up + ".interleaved"
        moe = helper.make_node(
            "MoE",
            [hidden, router_logits, fc1, "", down],
            [f"{node.name}/moe/out"],
            name=f"{node.name}/moe",
            domain=ORT_DOMAIN,
            k=top_k,
            normalize_routing_weights=normalize,
            activation_type="swiglu",
            swiglu_fusion=1,
            activation_alpha=1.0,
            activation_beta=0.0,
            use_sparse_mixer=0,
        )
        # few tokens (decode): gather the selected experts' weights instead; ORT's MoE kernel costs far
        # more than reading 8 experts once (measured on the Qwen3-30B-A3B slice)
        gathered = _gathered_experts(
            node.name, hidden, router_logits, fc1, down, top_k, normalize, rows // 2, hidden_size
        )
        tokens = helper.make_node("Shape", [hidden], [f"{node.name}/tokens"], start=0, end=1)
        few = helper.make_node(
            "LessOrEqual",
            [f"{node.name}/tokens", f"{node.name}/max_gather_tokens"],
            [f"{node.name}/few_tokens"],
        )
        limit = helper.make_node(
            "Constant",
            [],
            [f"{node.name}/max_gather_tokens"],
            value=helper.make_tensor("v", TensorProto.INT64, [1], [max(experts // top_k, 1)]),
        )
        branch = helper.make_node(
            "If",
            [f"{node.name}/few_tokens"],
            list(node.output),
            name=node.name,
            then_branch=_subgraph("gathered", gathered, f"{node.name}/gathered/out"),
            else_branch=_subgraph("moe", [moe], f"{node.name}/moe/out"),
        )
        return Replacement(
            [tokens, limit, few, branch], {fc1: interleave_gate_up(view.array(gate_up))}, {ORT_DOMAIN: 1}
        )


def _subgraph(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]
    )


def _gathered_experts(
    prefix: str,
    hidden: str,
    logits: str,
    fc1: str,
    down: str,
    top_k: int,
    normalize: int,
    inter: int,
    hidden_size: int,
) -> list[onnx.NodeProto]:
    """Routing as ExpertDispatch defines it, then each (token, slot) pair multiplies its own expert's
    gathered weights: [N*k, 2I, H] x [N*k, H, 1]. fc1 rows are interleaved (g0, u0, g1, u1, ...).
    Output: `{prefix}/gathered/out` [N, H]."""
    p = f"{prefix}/gathered/"
    nodes: list[onnx.NodeProto] = []

    def op(kind: str, inputs: list[str], outputs: int = 1, name: str | None = None, **attrs):
        names = [name] if name else [f"{p}{kind}_{len(nodes)}_{i}" for i in range(outputs)]
        nodes.append(helper.make_node(kind, inputs, names, name=f"{p}{kind}_{len(nodes)}", **attrs))
        return names[0] if outputs == 1 else names

    def const(values: list[int]) -> str:
        return op("Constant", [], value=helper.make_tensor("v", TensorProto.INT64, [len(values)], values))

    probs = op("Softmax", [logits], axis=-1)
    weights, index = op("TopK", [probs, const([top_k])], outputs=2, axis=-1)  # [N, k]
    if normalize:
        weights = op("Div", [weights, op("ReduceSum", [weights, const([-1])], keepdims=1)])
    flat = op("Reshape", [index, const([-1])])  # [N*k]
    x = op("Expand", [op("Unsqueeze", [hidden, const([1])]), const([1, top_k, 1])])  # [N, k, H]
    x = op("Reshape", [x, const([-1, hidden_size, 1])])  # [N*k, H, 1]
    gate_up = op("MatMul", [op("Gather", [fc1, flat], axis=0), x])  # [N*k, 2I, 1]
    gate, up = op(
        "Split", [op("Reshape", [gate_up, const([-1, inter, 2])])], outputs=2, axis=2, num_outputs=2
    )
    activated = op("Mul", [op("Mul", [gate, op("Sigmoid", [gate])]), up])  # [N*k, I, 1]
    out = op("MatMul", [op("Gather", [down, flat], axis=0), activated])  # [N*k, H, 1]
    out = op("Reshape", [out, const([-1, top_k, hidden_size])])  # [N, k, H]
    weighted = op("Mul", [out, op("Unsqueeze", [weights, const([2])])])
    op("ReduceSum", [weighted, const([1])], keepdims=0, name=f"{p}out")
    return nodes
