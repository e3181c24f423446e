"""Quantized artifacts record how ONNX Runtime must run them, and every session the toolchain opens on one
follows the record: at ENABLE_ALL, ORT fuses INT8 DequantizeLinear -> MatMul into MatMulNBits, by default at
accuracy level 4 (int8 activations), which would run a weight-only recipe as W8A8."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from qwen3_compile.export.stage import ExportOptions, export_onnx
from qwen3_compile.generation.artifact import load_ort_runner
from qwen3_compile.quantize.stage import quantize_artifact
from qwen3_compile.runtime.ort_settings import manifest_session_options, session_options

KEY = "session.qdq_matmulnbits_accuracy_level"


@pytest.fixture(scope="module")
def int8_wo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort-settings")
    export_onnx("tiny-dense", root / "export", ExportOptions())
    return quantize_artifact(root / "export", "int8-wo", root / "int8-wo")


def _matmulnbits_levels(model: Path, options: ort.SessionOptions, out: Path) -> list[int]:
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out), load_external_data=False).graph
    return [
        next(a.i for a in node.attribute if a.name == "accuracy_level")
        for node in graph.node
        if node.op_type == "MatMulNBits"
    ]


def test_manifest_pins_fp32_activations_where_ort_would_quantize_them(int8_wo, tmp_path):
    assert int8_wo.manifest["ort_optimization"] == "all"
    assert int8_wo.manifest["ort_session_config"] == {KEY: "1"}
    model = int8_wo.directory / "model.onnx"
    pinned = _matmulnbits_levels(model, manifest_session_options(int8_wo.manifest), tmp_path / "pinned.onnx")
    default = _matmulnbits_levels(model, session_options("all"), tmp_path / "default.onnx")
    # every projection of tiny-dense's 2 layers (q, k, v, o, gate, up, down) is fused either way
    assert len(pinned) == len(default) == 14
    assert set(pinned) == {1}
    assert set(default) != {1}  # ORT's own default quantizes the activations: the reason for the pin


def test_generation_and_bundle_runners_open_sessions_as_the_manifest_says(int8_wo):
    runner = load_ort_runner(int8_wo.directory, int8_wo.manifest)
    assert runner.session.get_session_options().get_session_config_entry(KEY) == "1"


def test_bundled_runner_applies_the_recorded_session_config(int8_wo, tmp_path, monkeypatch):
    """The runner that ships in bundles (it cannot import qwen3_compile) reads the same manifest fields."""
    import json
    import shutil

    device = Path(__file__).parents[2] / "qwen3_compile" / "bundle" / "device"
    spec = importlib.util.spec_from_file_location("bundle_runner_settings", device / "runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundle = tmp_path / "bundle"
    shutil.copytree(int8_wo.directory, bundle / "model")
    (bundle / "reference").mkdir()
    manifest = {"ort_optimization": "all", "ort_session_config": int8_wo.manifest["ort_session_config"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    opened = []
    real = ort.InferenceSession
    monkeypatch.setattr(
        ort,
        "InferenceSession",
        lambda path, options, **kw: opened.append(options) or real(path, options, **kw),
    )
    module.OrtBackend(bundle)
    assert [o.get_session_config_entry(KEY) for o in opened] == ["1"]
