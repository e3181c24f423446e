"""INT4 weight-only lowerings for ONNX Runtime: blocked DequantizeLinear -> MatMul to MatMulNBits, INT4
experts to QMoE (4 bits, block-wise scales). One-node graphs against the canonical graph and an independent
numpy dequantization on fresh random inputs; the whole tiny-dense / tiny-moe int4-rtn and int4-awq
artifacts lowered against their canonical graphs; the QMoE decline where ORT's QMoE has no block_size."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.backends.onnxruntime.settings import ORT_QDQ, session_options
from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, function
from qwen3_compile.lower import lower
from qwen3_compile.lower.ort_matmul_nbits import INT4_ZERO_POINT, pack_nibbles

from .moe_graphs import expert_dispatch_node

GROUP = 32


def symmetric_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per `group` values along the last axis: scale = max|w| / 7, q = round(w / scale) (this test's own)."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // group, group).astype(np.float64)
    scale = np.abs(g).max(axis=-1, keepdims=True) / 7
    q = np.clip(np.round(g / scale), -8, 7).astype(np.int8).reshape(w.shape)
    return q, scale[..., 0].astype(np.float32)


def dequantized(q: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    return q.astype(np.float64) * np.repeat(scale.astype(np.float64), group, axis=-1)


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """As an INT4 artifact's manifest says (`reference`): at ENABLE_ALL ORT would otherwise fuse the
    canonical DQ -> MatMul into its own MatMulNBits at accuracy level 4 (int8 activations)."""
    options = session_options("all", ORT_QDQ["reference"])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _model(nodes, inputs, initializers, functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def test_4bit_packing_low_nibble_first():
    """MatMulNBits' and QMoE's layout: symmetric values stored as q + 8, two a byte along K, low nibble
    first; an odd count padded with a zero high nibble."""
    q = np.array([[-7, 7, 0, -1], [1, 2, 3, 4]], dtype=np.int8)
    # q + 8: [1, 15, 8, 7] -> bytes 0xF1, 0x78; [9, 10, 11, 12] -> 0xA9, 0xCB
    assert pack_nibbles(q + INT4_ZERO_POINT).tolist() == [[0xF1, 0x78], [0xA9, 0xCB]]
    assert pack_nibbles(np.array([3, 12, 5])).tolist() == [0xC3, 0x05]


def linear_model(q_in_out: np.ndarray, scale: np.ndarray, group: int) -> onnx.ModelProto:
    """x [b, t, K] @ DequantizeLinear(int4 [K, N], scale [K / g, N], axis 0, block g): the canonical form."""
    k, _ = q_in_out.shape
    dq = helper.make_node("DequantizeLinear", ["w.q", "w.scale"], ["w"], axis=0, block_size=group)
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    inits = [
        numpy_helper.from_array(q_in_out.astype(ml_dtypes.int4), "w.q"),
        numpy_helper.from_array(scale, "w.scale"),
    ]
    return _model([dq, matmul], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])], inits)


@pytest.mark.parametrize("k, n, group", [(64, 48, 32), (256, 96, 128), (128, 40, 16)])
def test_matmul_nbits_rule_is_exact(k, n, group):
    rng = np.random.default_rng()
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1  # [out, in]
    q, scale = symmetric_int4(w, group)  # along the input axis
    canonical = linear_model(q.T, np.ascontiguousarray(scale.T), group)  # stored [in, out]
    x = rng.standard_normal((2, 7, k)).astype(np.float32)
    before = run(canonical, {"x": x})
    report = lower(canonical, "ort")
    assert report.applied == {"int4_matmul_to_matmul_nbits": 1} and not report.declined
    (node,) = canonical.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type) == ("com.microsoft", "MatMulNBits")
    assert attrs == {"K": k, "N": n, "bits": 4, "block_size": group, "accuracy_level": 1}
    after = run(canonical, {"x": x})
    want = x.astype(np.float64) @ dequantized(q, scale, group).T  # independent numpy dequantization
    np.testing.assert_allclose(before, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert np.abs(after - x @ w.T).max() > 1e-3  # and it computes the INT4 weights, not the float ones


def test_matmul_nbits_rule_fp16_keeps_fp16_activations():
    """fp16 graphs: fp16 scales, accuracy level 2 (fp16, never int8); equal to the canonical graph to fp16
    rounding and to the numpy dequantization."""
    rng = np.random.default_rng()
    k, n, group = 256, 96, 64
    q, scale = symmetric_int4(rng.standard_normal((n, k)).astype(np.float32) * 0.1, group)
    model = linear_model(q.T, np.ascontiguousarray(scale.T).astype(np.float16), group)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    x = rng.standard_normal((2, 3, k)).astype(np.float16)
    before = run(model, {"x": x})
    lower(model, "ort")
    (node,) = model.graph.node
    assert {(a.name, a.i) for a in node.attribute} >= {("accuracy_level", 2), ("bits", 4)}
    after = run(model, {"x": x})
    want = x.astype(np.float64) @ dequantized(q, scale.astype(np.float16), group).T
    np.testing.assert_allclose(after.astype(np.float64), want, atol=5e-3 * np.abs(want).max())
    np.testing.assert_allclose(after, before, atol=5e-3 * np.abs(want).max())


def test_matmul_nbits_weight_read_twice_is_packed_once():
    rng = np.random.default_rng()
    q, scale = symmetric_int4(rng.standard_normal((8, 64)).astype(np.float32), 32)
    model = linear_model(q.T, np.ascontiguousarray(scale.T), 32)
    model.graph.node.append(helper.make_node("MatMul", ["x", "w"], ["y2"], name="again"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    before = run(model, {"x": x})
    assert lower(model, "ort").applied == {"int4_matmul_to_matmul_nbits": 2}
    assert sorted(t.name for t in model.graph.initializer) == ["w.nbits", "w.nbits_scale"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, y2 = session.run(None, {"x": x})
    np.testing.assert_allclose(y, before, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, y2)


def test_matmul_nbits_rule_leaves_float_and_int8_matmuls():
    """Float MatMuls are not candidates (not reported); INT8 DQ -> MatMul stays as it is (not lowered)."""
    rng = np.random.default_rng()
    q8 = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    dq = helper.make_node("DequantizeLinear", ["w.q", "w.scale"], ["w"], axis=1)
    nodes = [dq, helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "f"], ["y"])]
    inits = [
        numpy_helper.from_array(q8, "w.q"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w.scale"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "f"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])], inits)
    report = lower(model, "ort")
    assert report.applied == {} and report.declined == {}
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul", "MatMul"]


def int4_dispatch_model(gate_up: np.ndarray, down: np.ndarray, top_k: int, group: int):
    """ExpertDispatch fed by blocked INT4 DequantizeLinear nodes; returns (model, dequantized experts)."""
    experts, rows, hidden = gate_up.shape
    inits, dequant, nodes = [], {}, []
    for name, w in (("gate_up", gate_up), ("down", down)):
        q, scale = symmetric_int4(w, group)
        inits += [
            numpy_helper.from_array(q.astype(ml_dtypes.int4), name + ".q"),
            numpy_helper.from_array(scale, name + ".scale"),
        ]
        dequant[name] = dequantized(q, scale, group)
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [name + ".q", name + ".scale"], [name], axis=2, block_size=group
            )
        )
    return dispatch_model(nodes, inits, experts, hidden, top_k), dequant


def dispatch_model(dequantize: list, inits: list, experts: int, hidden: int, top_k: int) -> onnx.ModelProto:
    """ExpertDispatch (SiLU, normalised top-k) over `gate_up` and `down`, which the `dequantize` nodes
    produce from `inits`; inputs `hidden` [n, hidden] and `router_logits` [n, experts]."""
    dispatch = expert_dispatch_node(["hidden", "router_logits", "gate_up", "down"], "y", top_k)
    inputs = [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", hidden]),
        helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, ["n", experts]),
    ]
    return _model([*dequantize, dispatch], inputs, inits, [function(EXPERT_DISPATCH, 21)])


def numpy_moe(hidden, logits, gate_up, down, top_k):
    """Softmax router, top-k renormalised, silu(gate) * up, down: Qwen3's MoE in float64."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros(hidden.shape, np.float64)
    for t, row in enumerate(probs):
        chosen = np.argsort(-row, kind="stable")[:top_k]
        weights = row[chosen] / row[chosen].sum()
        for e, p in zip(chosen, weights, strict=True):
            g, u = np.split(gate_up[e] @ hidden[t], 2)
            out[t] += p * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize(
    "experts, top_k, hidden_size, inter, group", [(8, 2, 64, 32, 32), (16, 4, 128, 64, 64)]
)
def test_int4_qmoe_rule_is_exact(experts, top_k, hidden_size, inter, group):
    rng = np.random.default_rng()
    gate_up = rng.standard_normal((experts, 2 * inter, hidden_size)).astype(np.float32) * 0.2
    down = rng.standard_normal((experts, hidden_size, inter)).astype(np.float32) * 0.2
    model, dq = int4_dispatch_model(gate_up, down, top_k, group)
    feeds = {
        "hidden": rng.standard_normal((13, hidden_size)).astype(np.float32),
        "router_logits": rng.standard_normal((13, experts)).astype(np.float32),
    }
    before = run(model, feeds)
    report = lower(model, "ort")
    assert report.applied == {"int4_expert_dispatch_to_ort_qmoe": 1}
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "QMoE" and attrs["expert_weight_bits"] == 4 and attrs["block_size"] == group
    assert "accuracy_level" not in attrs  # default 0: fp32 activations
    after = run(model, feeds)
    want = numpy_moe(
        feeds["hidden"].astype(np.float64), feeds["router_logits"], dq["gate_up"], dq["down"], top_k
    )
    np.testing.assert_allclose(before, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_int4_qmoe_declines_before_ort_1_24(monkeypatch):
    """Under an ONNX Runtime whose QMoE cannot take group-wise 4-bit scales exactly (1.22: per-row only;
    1.23: wrong numbers), INT4 experts stay ExpertDispatch (their reference body runs) and the report says
    why."""
    import onnxruntime

    import qwen3_compile.lower.ort_qmoe_int4 as rule

    rule.ort_qmoe_int4_blocks.cache_clear()
    monkeypatch.setattr(onnxruntime, "__version__", "1.23.2")
    rng = np.random.default_rng()
    model, _ = int4_dispatch_model(
        rng.standard_normal((8, 64, 64)).astype(np.float32),
        rng.standard_normal((8, 64, 32)).astype(np.float32),
        2,
        32,
    )
    report = lower(model, "ort")
    assert report.applied == {}
    (why,) = report.declined["int4_expert_dispatch_to_ort_qmoe"]
    rule.ort_qmoe_int4_blocks.cache_clear()
    assert "1.23.2" in why and "per-row" in why and "group-32" in why and ">= 1.24" in why
    assert [n.op_type for n in model.graph.node].count(EXPERT_DISPATCH) == 1


@pytest.mark.parametrize(
    "preset, recipe",
    [
        ("tiny-dense", "int4-rtn"),
        ("tiny-moe", "int4-rtn"),
        ("tiny-dense", "int4-awq"),
        pytest.param("tiny-moe", "int4-awq", marks=pytest.mark.slow),  # 30 s: AWQ's calibration
    ],
)
def test_lowered_int4_artifact_equals_canonical(preset, recipe, artifacts, tmp_path):
    """`lower --for ort` of a whole INT4 artifact: every INT4 projection a MatMulNBits, every INT4 expert
    block a QMoE, no DequantizeLinear left; logits equal the canonical graph's on random prompts."""
    from qwen3_compile.backends.base import left_padded_batch
    from qwen3_compile.backends.onnxruntime.loader import load_ort_runner
    from qwen3_compile.lower.stage import lower_artifact
    from qwen3_compile.storage.manifest import read_manifest

    canonical = artifacts.quantized(preset, recipe)
    quantized = artifacts.quantized_artifact(preset, recipe)
    lowered = lower_artifact(canonical, tmp_path / "ort", "ort")
    moe = preset == "tiny-moe"
    linear = sum(len(t.shape) == 2 for t in quantized.tensors)
    blocks = sum(len(t.shape) == 3 for t in quantized.tensors) // 2
    norms = 4 * quantized.manifest.architecture["num_hidden_layers"] + 1  # the ort set fuses RMSNorms too
    applied = {"int4_matmul_to_matmul_nbits": linear, "rms_norm_to_simplified_layer_norm": norms} | (
        {"int4_expert_dispatch_to_ort_qmoe": blocks} if moe else {}
    )
    assert lowered.manifest.lowering.applied == applied and not lowered.manifest.lowering.declined
    ops = lowered.op_histogram
    assert "DequantizeLinear" not in ops and ops["com.microsoft::MatMulNBits"] == linear
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 151643, 11).tolist(), rng.integers(0, 151643, 4).tolist()]
    batch = left_padded_batch(prompts, 0)
    outputs = []
    for folder in (canonical, lowered.directory):
        runner = load_ort_runner(folder, read_manifest(folder))
        cache = runner.empty_cache(2)
        logits, cache = runner.forward(batch.input_ids, batch.attention_mask, batch.position_ids, cache)
        outputs.append(logits)
    real = batch.attention_mask.astype(bool)
    np.testing.assert_allclose(outputs[1][real], outputs[0][real], atol=2e-4, rtol=1e-4)
