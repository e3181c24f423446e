"""INT8 weight-only on the tiny presets: exact symmetric per-channel math, the recipe's gates met against
the fp32 PyTorch reference in both reasoning modes, weights at most 0.55x of fp16, bad input refused."""

# The accuracy-gate tests validate with recipe_check=False: the graph against its recipe's fake-quantized
# model has its own tests (the graph-equals-fake-quant tests here, tests/validate/test_recipe_check.py).

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qwen3_compile.errors import BadInputError
from qwen3_compile.lower.stage import lower_artifact
from qwen3_compile.quantize.stage import quantize_artifact
from qwen3_compile.quantize.weights import quantize_int8
from qwen3_compile.validate.stage import validate_artifact

from .presets import GATE_PRESETS


@pytest.fixture(scope="module")
def exports(artifacts):
    return {name: artifacts.export(name) for name in ("tiny-dense", "tiny-moe")}


def test_quantize_int8_is_symmetric_per_channel():
    rng = np.random.default_rng()
    w = rng.standard_normal((5, 7, 33)).astype(np.float32)
    q, scale = quantize_int8(w, reduce_axis=2)
    assert q.dtype == np.int8 and scale.shape == (5, 7, 1)
    np.testing.assert_allclose(scale[..., 0], np.abs(w).max(axis=2) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127
    assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)


@pytest.mark.parametrize("preset", GATE_PRESETS)
def test_int8_wo_meets_recipe_gates(preset, artifacts, tmp_path):
    result = artifacts.quantized_artifact(preset, "int8-wo")  # shared: the report goes to tmp_path
    assert result.weight_ratio <= 0.55
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["stage"] == "quantize" and manifest["recipe"]["name"] == "int8-wo"
    model = onnx.load(result.directory / "model.onnx")
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(result.tensors) > 0
    weights = {t.name: t for t in model.graph.initializer}
    for node in dq:  # symmetric: no zero point input, int8 values
        assert len(node.input) == 2 and weights[node.input[0]].data_type == onnx.TensorProto.INT8
    if preset == "tiny-moe":
        scale = numpy_helper.to_array(weights["model.layers.0.mlp.experts.gate_up_proj.scale"])
        assert scale.shape == (16, 64, 1)  # one scale per expert and output row
    report = validate_artifact(
        result.directory,
        artifacts.loaded(preset),
        decode_steps=8,
        long_context_tokens=0,
        bisect=False,
        recipe_check=False,
        output=tmp_path / "v",
    )
    assert report.gates_source == "recipe int8-wo (random-weight stress gates)"
    recorded = json.loads((report.directory / "report.json").read_text())["backend_settings"]
    assert recorded["optimization"] == "all" and recorded["session_config"] == manifest["ort_session_config"]
    assert recorded["device"] == "cpu" and list(recorded["providers"]) == ["CPUExecutionProvider"]
    assert "session.disable_quant_qdq=1" in (report.directory / "report.md").read_text()
    assert report.passed, report.failures
    assert {"thinking", "non-thinking"} <= set(report.modes)


def test_refuses_lowered_or_bf16_exports(exports, artifacts, tmp_path):
    lowered = lower_artifact(exports["tiny-moe"], tmp_path / "ort", "ort").directory
    with pytest.raises(BadInputError) as info:
        quantize_artifact(lowered, "int8-wo", tmp_path / "out")
    assert info.value.field == "stage" and "'lower'" in info.value.problem
    bf16 = artifacts.export("tiny-dense", "bf16")
    with pytest.raises(BadInputError) as info:
        quantize_artifact(bf16, "int8-wo", tmp_path / "out")
    assert info.value.field == "options.dtype"
    with pytest.raises(BadInputError) as info:  # the fp16 baseline needs an fp16 export
        quantize_artifact(exports["tiny-dense"], "fp16", tmp_path / "out")
    assert info.value.field == "options.dtype" and "--dtype fp16" in info.value.fix
    assert not (tmp_path / "out").exists()


def test_int8_wo_on_fp16_export_keeps_fp16_scales(artifacts, tmp_path):
    """For TensorRT: an fp16 export quantizes to INT8 weights with fp16 scales (fp16 activations)."""
    half = artifacts.export("tiny-moe", "fp16")
    result = quantize_artifact(half, "int8-wo", tmp_path / "q")
    model = onnx.load(result.directory / "model.onnx")
    weights = {t.name: t for t in model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(half / "model.onnx").graph.initializer}
    for t in result.tensors:
        stored = t.name + (".T" if t.name + ".T" in original else "")
        scale = weights[stored + ".scale"]
        assert scale.data_type == onnx.TensorProto.FLOAT16
        w = original[stored].astype(np.float32)
        q = numpy_helper.to_array(weights[stored + ".q"]).astype(np.float32)
        s = numpy_helper.to_array(scale).astype(np.float32)
        s = s[None, :] if w.ndim == 2 else s
        assert (np.abs(q * s - w) <= 0.51 * s + 1e-3).all()  # half a step of its own row's scale


def test_int8_experts_lower_to_qmoe(artifacts, tmp_path):
    """`lower --for ort`: INT8 experts become com.microsoft::QMoE (uint8 = q + 128, fp32 row scales) and
    compute what the canonical QDQ graph computes, both run as their manifests say (ENABLE_ALL, the QDQ
    graph as written: backends/onnxruntime/settings.py)."""
    from qwen3_compile.backends.base import left_padded_batch
    from qwen3_compile.backends.onnxruntime.loader import load_ort_runner

    canonical = artifacts.quantized_artifact("tiny-moe", "int8-wo")
    lowered = lower_artifact(canonical.directory, tmp_path / "ort", "ort")
    ops = [n.op_type for n in onnx.load(lowered.directory / "model.onnx").graph.node]
    assert ops.count("QMoE") == 2 and "ExpertDispatch" not in ops
    assert lowered.manifest.lowering.applied == {
        "quantized_expert_dispatch_to_ort_qmoe": 2,
        "rms_norm_to_simplified_layer_norm": 9,
    }
    rng = np.random.default_rng()
    batch = left_padded_batch([rng.integers(0, 151643, 11).tolist(), rng.integers(0, 151643, 5).tolist()], 0)
    outputs = []
    for artifact in (canonical, lowered):
        runner = load_ort_runner(artifact.directory, artifact.manifest)
        outputs.append(
            runner.forward(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(2))[
                0
            ]
        )
    real = batch.attention_mask.astype(bool)
    np.testing.assert_allclose(outputs[1][real], outputs[0][real], atol=1e-4, rtol=1e-4)
