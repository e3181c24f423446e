"""ExpertDispatch: its ONNX function body against transformers' Qwen3 MoE block, and the ORT MoE rule
against the function body, on one-node graphs with fresh random inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, function
from qwen3_compile.lower import lower
from qwen3_compile.lower.ort_moe import interleave_gate_up

from .moe_graphs import expert_dispatch_node


def dispatch_model(gate_up: np.ndarray, down: np.ndarray, top_k: int, normalize: bool) -> onnx.ModelProto:
    experts, rows, hidden = gate_up.shape
    node = expert_dispatch_node(["hidden", "router_logits", "gate_up", "down"], "out", top_k, normalize)
    graph = helper.make_graph(
        [node],
        "dispatch",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", hidden]),
            helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, ["n", experts]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", hidden])],
        [numpy_helper.from_array(gate_up, "gate_up"), numpy_helper.from_array(down, "down")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
        functions=[function(EXPERT_DISPATCH, 21)],
    )
    model.ir_version = 10
    return model


def run(model: onnx.ModelProto, hidden: np.ndarray, logits: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"hidden": hidden, "router_logits": logits})[0]


def transformers_block(hidden, weight_router, gate_up, down, top_k, normalize):
    """Reference: transformers' Qwen3MoeSparseMoeBlock with the same weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    experts, rows, h = gate_up.shape
    config = Qwen3MoeConfig(
        hidden_size=h,
        moe_intermediate_size=rows // 2,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=normalize,
    )
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(weight_router))
        block.experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
        block.experts.down_proj.copy_(torch.from_numpy(down))
        return block(torch.from_numpy(hidden)[None])[0].numpy()


@pytest.mark.parametrize(
    "experts, top_k, normalize, tokens", [(16, 4, True, 9), (16, 2, False, 1), (32, 8, True, 33)]
)
def test_function_body_matches_transformers(experts, top_k, normalize, tokens):
    rng = np.random.default_rng()
    hidden_size, inter = 24, 12
    hidden = rng.standard_normal((tokens, hidden_size), dtype=np.float32)
    router = rng.standard_normal((experts, hidden_size), dtype=np.float32) * 0.5
    gate_up = rng.standard_normal((experts, 2 * inter, hidden_size), dtype=np.float32) * 0.2
    down = rng.standard_normal((experts, hidden_size, inter), dtype=np.float32) * 0.2
    logits = hidden @ router.T
    got = run(dispatch_model(gate_up, down, top_k, normalize), hidden, logits)
    want = transformers_block(hidden, router, gate_up, down, top_k, normalize)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_router_ties_pick_lower_expert_index():
    """All-equal logits: experts 0..k-1 are chosen, as the op's definition says (ONNX TopK order).

    torch.topk on CPU does not break ties by index (16 equal values, k=4 gives [10, 11, 12, 9]), so on
    exact router ties transformers may pick other experts; our op pins the deterministic choice."""
    rng = np.random.default_rng()
    experts, top_k, h, inter = 16, 4, 8, 4
    gate_up = rng.standard_normal((experts, 2 * inter, h), dtype=np.float32)
    down = rng.standard_normal((experts, h, inter), dtype=np.float32)
    hidden = rng.standard_normal((3, h), dtype=np.float32)
    logits = np.zeros((3, experts), dtype=np.float32)
    got = run(dispatch_model(gate_up, down, top_k, True), hidden, logits)
    x = torch.from_numpy(hidden)
    want = torch.zeros_like(x)
    for e in range(top_k):
        g, u = (x @ torch.from_numpy(gate_up[e]).T).chunk(2, dim=-1)
        want += (torch.nn.functional.silu(g) * u) @ torch.from_numpy(down[e]).T / top_k
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_interleave_gate_up():
    gate_up = np.arange(2 * 3 * 2, dtype=np.float32).reshape(1, 6, 2)  # I=3: rows g0 g1 g2 u0 u1 u2
    rows = interleave_gate_up(gate_up)[0, :, 0].tolist()
    assert rows == [0.0, 6.0, 2.0, 8.0, 4.0, 10.0]  # g0 u0 g1 u1 g2 u2


@pytest.mark.parametrize("top_k, normalize", [(4, True), (2, False)])
def test_ort_moe_rule_is_exact(top_k, normalize):
    rng = np.random.default_rng()
    experts, h, inter, tokens = 16, 32, 16, 17
    gate_up = rng.standard_normal((experts, 2 * inter, h), dtype=np.float32) * 0.3
    down = rng.standard_normal((experts, h, inter), dtype=np.float32) * 0.3
    hidden = rng.standard_normal((tokens, h), dtype=np.float32)
    logits = rng.standard_normal((tokens, experts), dtype=np.float32)
    canonical = dispatch_model(gate_up, down, top_k, normalize)
    before = run(canonical, hidden, logits)
    report = lower(canonical, "ort")
    assert report.applied == {"expert_dispatch_to_ort_moe": 1}
    assert [n.op_type for n in canonical.graph.node] == ["MoE"] and not canonical.functions
    np.testing.assert_allclose(run(canonical, hidden, logits), before, rtol=1e-4, atol=1e-5)


def _as_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def _fp16_case(rng, experts=16, h=128, inter=64, tokens=9):
    gate_up = rng.standard_normal((experts, 2 * inter, h), dtype=np.float32) * 0.1
    down = rng.standard_normal((experts, h, inter), dtype=np.float32) * 0.1
    hidden = rng.standard_normal((tokens, h), dtype=np.float32)
    logits = rng.standard_normal((tokens, experts), dtype=np.float32)
    return gate_up, down, hidden, logits


def test_fp16_experts_when_asked():
    """An explicit ort-moe (half_experts) lowers fp16 experts: the fp32 router logits are cast to fp16 in
    front of MoE, fc1 is the interleaved fp16 gate/up, and the graph passes the checker."""
    gate_up, down, _, _ = _fp16_case(np.random.default_rng())
    model = _as_fp16(dispatch_model(gate_up, down, 4, True))
    report = lower(model, "ort", half_experts=True)
    assert report.applied == {"expert_dispatch_to_ort_moe": 1}
    cast, moe = model.graph.node
    assert (cast.op_type, moe.op_type) == ("Cast", "MoE") and moe.input[1] == cast.output[0]
    assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT16
    fc1 = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[moe.input[2]]
    assert fc1.dtype == np.float16
    np.testing.assert_array_equal(fc1, interleave_gate_up(gate_up.astype(np.float16)))
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.gpu
def test_fp16_experts_on_ort_cuda_match_the_function_body():
    """ORT's CUDA MoE on the fp16 lowering against the canonical graph's function body in fp32 (ORT CPU), on
    the same fp16-rounded weights and inputs; a token whose top-k margin is below fp16's resolution may route
    differently, so the check is on the median and the 99th percentile of the error."""
    cuda = [p for p in ort.get_available_providers() if p == "CUDAExecutionProvider"]
    if not cuda:
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider)")
    rng = np.random.default_rng()
    gate_up, down, hidden, logits = _fp16_case(rng, tokens=64)
    gate_up, down = gate_up.astype(np.float16).astype(np.float32), down.astype(np.float16).astype(np.float32)
    hidden = hidden.astype(np.float16)
    reference = run(dispatch_model(gate_up, down, 4, True), hidden.astype(np.float32), logits)
    model = _as_fp16(dispatch_model(gate_up, down, 4, True))
    lower(model, "ort", half_experts=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=cuda)
    out = session.run(None, {"hidden": hidden, "router_logits": logits})[0].astype(np.float32)
    error = np.abs(out - reference).max(axis=1) / np.abs(reference).max()
    assert np.median(error) < 5e-3 and np.quantile(error, 0.99) < 5e-2, error


def test_rule_declines_with_reason():
    """By default fp16 experts stay as ExpertDispatch (ORT CPU MoE is fp32-only) and the report says why."""
    rng = np.random.default_rng()
    model = dispatch_model(
        rng.standard_normal((16, 8, 4), dtype=np.float32),
        rng.standard_normal((16, 4, 4), dtype=np.float32),
        2,
        True,
    )
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    report = lower(model, "ort")
    assert report.applied == {}
    assert "fp32" in report.declined["expert_dispatch_to_ort_moe"][0]
