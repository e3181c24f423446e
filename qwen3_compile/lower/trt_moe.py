"""ExpertDispatch -> routing in-graph + TensorRT's `TRT_MoE` (the native IMoELayer, TensorRT >= 10.16 on
SM 10.x/11.x).

IMoELayer takes the routing result, not the router logits: hidden [B, S, H], the selected experts
[B, S, k] (int32) and their scores [B, S, k] in the activation type; gate and up weights [E, H, I] and
down weights [E, I, H] (input-major, the transpose of the checkpoint's [out, in]); `activation_type` 1 is
SiLU, so each expert computes down(silu(x gate) * (x up)). Routing stays ONNX ops exactly as the
reference body defines it: softmax in fp32, TopK (ties to the lower index), optional renormalisation.
ExpertDispatch is token-major [N, H], so the rule adds a leading axis of 1 around the layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

TRT_DOMAIN = "trt"
ACTIVATION_SILU = 1
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def trt_moe_weights(gate_up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[E, 2I, H] gate rows then up rows, [E, H, I] -> gate [E, H, I], up [E, H, I], down [E, I, H]."""
    inter = gate_up.shape[1] // 2
    gate = np.ascontiguousarray(gate_up[:, :inter].transpose(0, 2, 1))
    up = np.ascontiguousarray(gate_up[:, inter:].transpose(0, 2, 1))
    return gate, up, np.ascontiguousarray(down.transpose(0, 2, 1))


class ExpertDispatchToTrtMoE(RewriteRule):
    name = "expert_dispatch_to_trt_moe"
    target_op = (DOMAIN, EXPERT_DISPATCH)

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if (node.domain, node.op_type) != self.target_op:
            return "not an ExpertDispatch node"
        if view.attrs(node).get("activation", b"silu") not in (b"silu", "silu"):
            return "TRT_MoE's gated activations are none and SiLU only"
        for name in node.input[2:4]:
            if name not in view.initializers:
                return (
                    f"expert weights '{name}' are not float initializers (quantized experts: TRT_MoE "
                    "quantizes only its mul output, to FP8; use the plugin or dense lowering)"
                )
            if view.elem_type(name) not in _FLOAT_TYPES:
                return f"expert weights '{name}' are not fp32/fp16/bf16"
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        hidden, router_logits, gate_up, down = node.input
        attrs = view.attrs(node)
        act_type = view.elem_type(gate_up)
        p = f"{node.name}/trt_moe"
        gate, up, down_t = trt_moe_weights(view.array(gate_up), view.array(down))
        arrays = {f"{gate_up}.gate": gate, f"{gate_up}.up": up, f"{down}.input_major": down_t}
        constants = {
            f"{p}/k": np.array([int(attrs["top_k"])], dtype=np.int64),
            f"{p}/last_axis": np.array([-1], dtype=np.int64),
            f"{p}/lead_axis": np.array([0], dtype=np.int64),
        }
        nodes = [
            helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))
            for name, value in constants.items()
        ]
        nodes += [
            helper.make_node("Cast", [router_logits], [f"{p}/logits_f32"], name=f"{p}/cast_logits", to=1),
            helper.make_node("Softmax", [f"{p}/logits_f32"], [f"{p}/probs"], name=f"{p}/softmax", axis=-1),
            helper.make_node(
                "TopK",
                [f"{p}/probs", f"{p}/k"],
                [f"{p}/top_values", f"{p}/top_indices"],
                name=f"{p}/topk",
                axis=-1,
                largest=1,
                sorted=1,
            ),
        ]
        scores = f"{p}/top_values"
        if int(attrs["normalize"]):
            nodes += [
                helper.make_node(
                    "ReduceSum",
                    [scores, f"{p}/last_axis"],
                    [f"{p}/top_sum"],
                    name=f"{p}/top_sum",
                    keepdims=1,
                ),
                helper.make_node("Div", [scores, f"{p}/top_sum"], [f"{p}/normalized"], name=f"{p}/normalize"),
            ]
            scores = f"{p}/normalized"
        nodes += [
            helper.make_node("Cast", [scores], [f"{p}/scores"], name=f"{p}/cast_scores", to=act_type),
            helper.make_node("Cast", [f"{p}/top_indices"], [f"{p}/experts"], name=f"{p}/cast_ids", to=6),
        ]
        for value in (hidden, f"{p}/experts", f"{p}/scores"):
            nodes.append(
                helper.make_node(
                    "Unsqueeze", [value, f"{p}/lead_axis"], [f"{value}/bsk"], name=f"{p}/unsqueeze_{value}"
                )
            )
        nodes += [
            helper.make_node(
                "TRT_MoE",
                [f"{hidden}/bsk", f"{p}/experts/bsk", f"{p}/scores/bsk", *arrays],
                [f"{p}/output"],
                name=node.name,
                domain=TRT_DOMAIN,
                activation_type=ACTIVATION_SILU,
            ),
            helper.make_node(
                "Squeeze", [f"{p}/output", f"{p}/lead_axis"], list(node.output), name=f"{p}/squeeze"
            ),
        ]
        return Replacement(nodes, arrays, {TRT_DOMAIN: 1})
