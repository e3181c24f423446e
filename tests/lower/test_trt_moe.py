"""ExpertDispatch -> routing in-graph + TRT_MoE. ONNX Runtime cannot run TRT_MoE, so the lowered graph runs
in ONNX's reference evaluator with TRT_MoE implemented from TensorRT's IMoELayer documentation (selected
experts and scores in, SiLU-gated experts with [E, H, I] / [E, I, H] weights), against ONNX Runtime on the
canonical node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, function
from qwen3_compile.lower import lower
from qwen3_compile.lower.trt_moe import TRT_DOMAIN

from .moe_graphs import expert_dispatch_node

OPSET = 21


class TRT_MoE(OpRun):  # noqa: N801 (the op's name)
    op_domain = TRT_DOMAIN

    def _run(self, hidden, experts, scores, gate, up, down, activation_type=None):
        # hidden [B, S, H]; experts, scores [B, S, k]; gate, up [E, H, I]; down [E, I, H]
        assert activation_type == 1  # SiLU
        out = np.zeros(hidden.shape, dtype=np.float64)
        for b, s, j in np.ndindex(experts.shape):
            e, x = experts[b, s, j], hidden[b, s].astype(np.float64)
            g, u = x @ gate[e], x @ up[e]
            out[b, s] += scores[b, s, j] * ((g / (1 + np.exp(-g)) * u) @ down[e])
        return (out.astype(hidden.dtype),)


def _dispatch_model(rng, tokens, hidden, experts, inter, top_k, normalize):
    weights = {
        "gate_up": rng.normal(0, 0.2, (experts, 2 * inter, hidden)).astype(np.float32),
        "down": rng.normal(0, 0.2, (experts, hidden, inter)).astype(np.float32),
    }
    node = expert_dispatch_node(
        ["hidden", "logits", "gate_up", "down"], "out", top_k, normalize, name="layers.0/experts"
    )
    graph = helper.make_graph(
        [node],
        "dispatch",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", hidden]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", experts]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", hidden])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=[function(EXPERT_DISPATCH, OPSET)],
    )
    feeds = {
        "hidden": rng.normal(0, 1, (tokens, hidden)).astype(np.float32),
        "logits": rng.normal(0, 2, (tokens, experts)).astype(np.float32),
    }
    return model, feeds


@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("tokens, hidden, experts, inter, top_k", [(7, 64, 16, 32, 4), (1, 32, 8, 16, 2)])
def test_trt_moe_matches_canonical(normalize, tokens, hidden, experts, inter, top_k):
    rng = np.random.default_rng()
    model, feeds = _dispatch_model(rng, tokens, hidden, experts, inter, top_k, normalize)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]

    report = lower(model, "trt-moe")
    assert report.applied == {"expert_dispatch_to_trt_moe": 1}
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model)
    (moe,) = [n for n in model.graph.node if n.op_type == "TRT_MoE"]
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert [shapes[i] for i in moe.input[3:]] == [
        (experts, hidden, inter),
        (experts, hidden, inter),
        (experts, inter, hidden),
    ]
    got = ReferenceEvaluator(model, new_ops=[TRT_MoE]).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_quantized_experts_fall_back_to_dense():
    rng = np.random.default_rng()
    model, feeds = _dispatch_model(rng, 5, 32, 8, 16, 2, 1)
    # the down weights behind a DequantizeLinear, as the int8-wo recipe writes them
    down = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "down"))
    scale = (np.abs(down).max(axis=2, keepdims=True) / 127).astype(np.float32)
    quantized = np.round(down / scale).astype(np.int8)
    model.graph.initializer.extend(
        [numpy_helper.from_array(quantized, "down_q"), numpy_helper.from_array(scale, "down_s")]
    )
    dequantize = helper.make_node(
        "DequantizeLinear", ["down_q", "down_s"], ["down_dq"], axis=2, block_size=16
    )
    model.graph.node.insert(0, dequantize)
    model.graph.node[1].input[3] = "down_dq"
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]

    report = lower(model, "trt-moe")
    assert report.applied == {"expert_dispatch_to_dense_experts": 1}
    assert "DequantizeLinear" in {n.op_type for n in model.graph.node}
    got = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
