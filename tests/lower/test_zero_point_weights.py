"""Imported asymmetric linears (AWQ, GPTQ with zero points) for TensorRT: the zero-point DequantizeLinear
rewritten as a signed one plus an exact block-sum correction (lower/trt_zero_points.py). One-node graphs
against an independent numpy dequantization on fresh random inputs (INT4 and INT8, desc_act order, fp16);
whole imported checkpoints lowered as `build`/`bundle` lower them, against the unlowered graph; and the
zero-point inputs of MatMulNBits and QMoE for ONNX Runtime."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.backends.base import generate, left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.backends.onnxruntime.settings import ORT_QDQ, session_options
from qwen3_compile.cli import main
from qwen3_compile.lower import lower
from qwen3_compile.lower.for_tensorrt import MoeChoice, lower_for_build

from ..models.quantized_checkpoints import save_quantized_checkpoint

# ORT as a quantized artifact asks for it: DequantizeLinear -> MatMul not fused into int8 activations
EXACT = ORT_QDQ["reference"]
UNSIGNED = {4: (TensorProto.UINT4, ml_dtypes.uint4, 15), 8: (TensorProto.UINT8, np.uint8, 255)}


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = session_options("all", ORT_QDQ["reference"])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def asymmetric_linear(k, n, group, bits, float_type=np.float32, desc_act=False, rng=None):
    """x @ DequantizeLinear(u [K, N], s [K/g, N], z [K/g, N], axis 0, block g) (+ the desc_act Gather, rows
    stored sorted by group); returns (model, the float weight [K, N] in channel order, in float64)."""
    rng = rng or np.random.default_rng()
    onnx_type, np_type, top = UNSIGNED[bits]
    u = rng.integers(0, top + 1, (k, n))
    z = rng.integers(0, top + 1, (k // group, n))
    s = (rng.uniform(0.5, 2.0, (k // group, n)) * 0.01).astype(float_type)
    sorted_w = (u - np.repeat(z, group, axis=0)) * np.repeat(s.astype(np.float64), group, axis=0)
    inits = [
        numpy_helper.from_array(u.astype(np_type), "w.q"),
        numpy_helper.from_array(s, "w.scale"),
        numpy_helper.from_array(z.astype(np_type), "w.zero_point"),
    ]
    dq_out = "w.sorted" if desc_act else "w"
    nodes = [
        helper.make_node(
            "DequantizeLinear", ["w.q", "w.scale", "w.zero_point"], [dq_out], axis=0, block_size=group
        )
    ]
    weight = sorted_w
    if desc_act:  # channel i's row is sorted row restore[i]
        restore = rng.permutation(k).astype(np.int64)
        inits.append(numpy_helper.from_array(restore, "w.order"))
        nodes.append(helper.make_node("Gather", ["w.sorted", "w.order"], ["w"], axis=0, name="w/Gather"))
        weight = sorted_w[restore]
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"))
    elem = TensorProto.FLOAT if float_type == np.float32 else TensorProto.FLOAT16
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, ["b", "t", k])],
        [helper.make_tensor_value_info("y", elem, ["b", "t", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return model, weight


def _no_zero_points(model: onnx.ModelProto) -> None:
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            assert len(node.input) == 2 or not node.input[2], node.name
            assert types[node.input[0]] in (TensorProto.INT4, TensorProto.INT8), node.name


@pytest.mark.parametrize(
    "k, n, group, bits, desc_act",
    [(64, 48, 32, 4, False), (256, 40, 128, 4, False), (96, 24, 32, 8, False), (128, 32, 32, 4, True)],
)
def test_zero_point_rule_is_exact(k, n, group, bits, desc_act):
    rng = np.random.default_rng()
    model, weight = asymmetric_linear(k, n, group, bits, desc_act=desc_act, rng=rng)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    want = x.astype(np.float64) @ weight  # independent numpy dequantization
    before = run(model, x)
    report = lower(model, "trt-symmetric-weights")
    assert report.applied == {"zero_point_weights_to_symmetric": 1} and not report.declined
    onnx.checker.check_model(model, full_check=True)
    _no_zero_points(model)
    after = run(model, x)
    scale = np.abs(want).max()
    np.testing.assert_allclose(before, want, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(after, want, atol=1e-5 * scale, rtol=0)
    # the correction carries real weight: without it the product is far off
    signed_only = x.astype(np.float64) @ (weight - _correction_term(model, weight.shape, group, desc_act))
    assert np.abs(signed_only - want).max() > 0.1 * scale


def _correction_term(model, shape, group, desc_act):
    """The block-constant part the rule moved out of the weight, expanded to [K, N] in channel order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    c = np.repeat(inits["w.zero_correction"].astype(np.float64), group, axis=0)
    if desc_act:
        c = c[np.argsort(inits["w.sorted_order"])]
    assert c.shape == shape
    return c


def test_zero_point_rule_fp16():
    rng = np.random.default_rng()
    model, weight = asymmetric_linear(256, 64, 128, 4, float_type=np.float16, rng=rng)
    x = rng.standard_normal((1, 3, 256)).astype(np.float16)
    want = x.astype(np.float64) @ weight
    before = run(model, x)
    lower(model, "trt-symmetric-weights")
    _no_zero_points(model)
    after = run(model, x).astype(np.float64)
    tol = 4e-3 * np.abs(want).max()  # fp16 rounding of the weights and of the two sums
    np.testing.assert_allclose(after, want, atol=tol, rtol=0)
    np.testing.assert_allclose(after, before.astype(np.float64), atol=tol, rtol=0)


def test_block_shape_shared_and_symmetric_weights_untouched():
    """Two asymmetric weights of the same K share one block shape; the graph gains no float weight but the
    corrections (as many numbers as the scales); a symmetric INT4 weight is neither rewritten nor reported."""
    rng = np.random.default_rng()
    model, _ = asymmetric_linear(64, 16, 32, 4, rng=rng)
    second, _ = asymmetric_linear(64, 8, 32, 4, rng=rng)
    for t in second.graph.initializer:
        t.name = t.name.replace("w.", "v.")
        model.graph.initializer.append(t)
    model.graph.node.extend(
        [
            helper.make_node(
                "DequantizeLinear", ["v.q", "v.scale", "v.zero_point"], ["v"], axis=0, block_size=32
            ),
            helper.make_node("MatMul", ["x", "v"], ["y2"], name="proj2"),
            helper.make_node(
                "DequantizeLinear", ["s.q", "s.scale"], ["s"], axis=0, block_size=32, name="symmetric"
            ),
            helper.make_node("MatMul", ["x", "s"], ["y3"], name="proj3"),
        ]
    )
    q = rng.integers(-8, 8, (64, 4)).astype(ml_dtypes.int4)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(q, "s.q"),
            numpy_helper.from_array(np.full((2, 4), 0.1, np.float32), "s.scale"),
        ]
    )
    for name in ("y2", "y3"):
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    report = lower(model, "trt-symmetric-weights")
    assert report.applied == {"zero_point_weights_to_symmetric": 2} and not report.declined
    names = sorted(t.name for t in model.graph.initializer)
    assert names == sorted(
        ["w.q_signed", "w.scale", "w.zero_correction", "v.q_signed", "v.scale", "v.zero_correction"]
        + ["s.q", "s.scale", "zero_point.blocks.64x32", "zero_point.sum_axis"]
    )
    assert [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"].count("s.q") == 1


# ---- whole imported checkpoints ----------------------------------------------------------------------


def _export(tmp_path, kind, arch="tiny-dense", **opts):
    checkpoint, out = tmp_path / "checkpoint", tmp_path / "onnx"
    save_quantized_checkpoint(checkpoint, arch, kind, **opts)
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out / "model.onnx"


@pytest.mark.parametrize(
    ("kind", "opts"),
    [("awq", {}), ("gptq", {"sym": False, "desc_act": True}), ("gptq", {"sym": False, "bits": 8})],
)
def test_imported_asymmetric_checkpoint_lowered_for_tensorrt_matches(tmp_path, kind, opts):
    model_path = _export(tmp_path, kind, **opts)
    (tmp_path / "scratch").mkdir()
    lowered = lower_for_build(model_path, MoeChoice("none"), tmp_path / "scratch")
    assert lowered.report["applied"] == {"zero_point_weights_to_symmetric": 14}  # 2 layers x 7 linears
    graph = onnx.load(str(lowered.path), load_external_data=False)
    _no_zero_points(graph)

    rng = np.random.default_rng()
    prompts = [list(rng.integers(0, 151000, size=n)) for n in (9, 4)]
    batch = left_padded_batch(prompts, pad_id=151643)
    before = generate(OrtRunner(model_path, session_config=EXACT), batch, steps=3)
    after = generate(OrtRunner(lowered.path, session_config=EXACT), batch, steps=3)
    mask = batch.attention_mask.astype(bool)
    np.testing.assert_allclose(after.prefill_logits[mask], before.prefill_logits[mask], atol=2e-4, rtol=0)
    for a, b in zip(after.step_logits, before.step_logits, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)
    np.testing.assert_array_equal(after.tokens, before.tokens)


@pytest.mark.parametrize("arch", ["tiny-dense", "tiny-moe"])
def test_awq_import_lowered_for_ort_takes_zero_points(tmp_path, arch):
    """ONNX Runtime: AWQ linears become MatMulNBits with their zero points, AWQ experts QMoE with theirs
    (where this onnxruntime's QMoE has them); equal to the unlowered graph."""
    from qwen3_compile.lower.ort_qmoe_int4 import ort_qmoe_zero_points

    model_path = _export(tmp_path, "awq", arch=arch)
    model = onnx.load(str(model_path))
    before_model = onnx.load(str(model_path))
    report = lower(model, "ort")
    linears = 14 if arch == "tiny-dense" else 8  # 7 or 4 linears a layer (the experts go to QMoE)
    assert report.applied["int4_matmul_to_matmul_nbits"] == linears
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == linears and all(len(n.input) == 4 for n in nbits)
    if arch == "tiny-moe" and ort_qmoe_zero_points():
        qmoe = [n for n in model.graph.node if n.op_type == "QMoE"]
        assert len(qmoe) == 2 and all(len(n.input) == 13 for n in qmoe)
        assert not [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    out_before, out_after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(before_model, str(out_before))
    onnx.save(model, str(out_after))
    rng = np.random.default_rng()
    batch = left_padded_batch([list(rng.integers(0, 151000, size=7))], pad_id=151643)
    before = generate(OrtRunner(out_before, session_config=EXACT), batch, steps=2)
    after = generate(OrtRunner(out_after, session_config=EXACT), batch, steps=2)
    np.testing.assert_allclose(after.prefill_logits, before.prefill_logits, atol=2e-4, rtol=0)
    np.testing.assert_array_equal(after.tokens, before.tokens)


# ---- MoE experts with zero points on ONNX Runtime: QMoE's zero-point inputs -------------------------


def test_asymmetric_int4_experts_lowered_to_qmoe_zero_points():
    """ExpertDispatch over stacked AWQ-style experts (uint4 values, uint4 zero points, per group of 32) ->
    QMoE with fc1/fc2 zero points, against numpy's Qwen3 MoE on the independently dequantized experts."""
    from qwen3_compile.backends.onnxruntime.settings import installed_version
    from qwen3_compile.lower.ort_qmoe_int4 import ort_qmoe_zero_points

    from .test_ort_int4 import dispatch_model, numpy_moe
    from .test_ort_int4 import run as run_moe

    release = tuple(int(p) for p in installed_version().split(".")[:2])
    if release < (1, 32) and not ort_qmoe_zero_points():
        pytest.skip(f"onnxruntime {installed_version()}'s QMoE has no zero-point inputs")
    assert ort_qmoe_zero_points()  # 1.32 declares them: the schema query must find them
    rng = np.random.default_rng()
    experts, top_k, hidden, inter, group = 8, 2, 64, 32, 32
    inits, dequant, nodes = [], {}, []
    for name, (rows, cols) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
        u = rng.integers(0, 16, (experts, rows, cols))
        z = rng.integers(0, 16, (experts, rows, cols // group))
        s = (rng.uniform(0.5, 2.0, (experts, rows, cols // group)) * 0.02).astype(np.float32)
        dequant[name] = (u - np.repeat(z, group, axis=2)) * np.repeat(s.astype(np.float64), group, axis=2)
        inits += [
            numpy_helper.from_array(u.astype(ml_dtypes.uint4), name + ".q"),
            numpy_helper.from_array(s, name + ".scale"),
            numpy_helper.from_array(z.astype(ml_dtypes.uint4), name + ".zero_point"),
        ]
        inputs = [name + ".q", name + ".scale", name + ".zero_point"]
        nodes.append(helper.make_node("DequantizeLinear", inputs, [name], axis=2, block_size=group))
    model = dispatch_model(nodes, inits, experts, hidden, top_k)
    feeds = {
        "hidden": rng.standard_normal((13, hidden)).astype(np.float32),
        "router_logits": rng.standard_normal((13, experts)).astype(np.float32),
    }
    before = run_moe(model, feeds)
    report = lower(model, "ort")
    assert report.applied == {"int4_expert_dispatch_to_ort_qmoe": 1}, report
    (node,) = model.graph.node
    assert node.op_type == "QMoE" and len(node.input) == 13 and node.input[11] and node.input[12]
    after = run_moe(model, feeds)
    hidden64 = feeds["hidden"].astype(np.float64)
    want = numpy_moe(hidden64, feeds["router_logits"], dequant["gate_up"], dequant["down"], top_k)
    np.testing.assert_allclose(before, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after, want, rtol=1e-4, atol=1e-5)
