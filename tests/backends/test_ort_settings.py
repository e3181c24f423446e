"""Quantized artifacts record how ONNX Runtime must run them, and every session the toolchain opens on one
follows the record. By default (`--ort-qdq reference`) ORT runs the QDQ graph as written; left to itself at
ENABLE_ALL it fuses INT8 DequantizeLinear -> MatMul into MatMulNBits at accuracy level 4 (int8 activations),
which would run a weight-only recipe as W8A8."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from qwen3_compile.backends.onnxruntime.loader import load_ort_runner
from qwen3_compile.backends.onnxruntime.settings import THREADS_ENV, manifest_session_options, session_options
from qwen3_compile.errors import BadInputError
from qwen3_compile.quantize.stage import quantize_artifact
from qwen3_compile.storage.manifest import read_manifest

KEY = "session.disable_quant_qdq"
ACCURACY = "session.qdq_matmulnbits_accuracy_level"


@pytest.fixture(scope="module")
def int8_wo(artifacts):
    return artifacts.quantized_artifact("tiny-dense", "int8-wo")


def _matmulnbits_levels(model: Path, options: ort.SessionOptions, out: Path) -> list[int]:
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out), load_external_data=False).graph
    return [
        next(a.i for a in node.attribute if a.name == "accuracy_level")
        for node in graph.node
        if node.op_type == "MatMulNBits"
    ]


def test_reference_runs_the_qdq_graph_as_written_where_ort_would_fuse_it(int8_wo, tmp_path):
    assert int8_wo.manifest.ort_optimization == "all"
    assert int8_wo.manifest.ort_session_config == {KEY: "1"}
    model = int8_wo.directory / "model.onnx"
    recorded = _matmulnbits_levels(model, manifest_session_options(int8_wo.manifest), tmp_path / "ref.onnx")
    default = _matmulnbits_levels(model, session_options("all"), tmp_path / "default.onnx")
    assert recorded == []
    # ORT left to itself fuses every projection of tiny-dense's 2 layers (q, k, v, o, gate, up, down)
    assert len(default) == 14


def test_fused_is_recorded_and_followed(int8_wo, artifacts, tmp_path):
    from click.testing import CliRunner

    from qwen3_compile.cli import main

    export = artifacts.export("tiny-dense")
    out = tmp_path / "fused"
    args = ["quantize", str(export), "--recipe", "int8-wo", "--ort-qdq", "fused", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.ort_session_config == {ACCURACY: "4"}
    levels = _matmulnbits_levels(out / "model.onnx", manifest_session_options(manifest), tmp_path / "o.onnx")
    assert levels == [4] * 14
    with pytest.raises(BadInputError, match="--ort-qdq"):
        quantize_artifact(export, "int8-wo", tmp_path / "bad", ort_qdq="int4")
    assert not (tmp_path / "bad").exists()


def test_generation_runner_opens_its_session_as_the_manifest_says(int8_wo):
    """`run`, validation and the QMoE test open sessions through load_ort_runner; the bundled runner has its
    own test (tests/bundle/test_runner_parts.py)."""
    runner = load_ort_runner(int8_wo.directory, int8_wo.manifest)
    assert runner.session.get_session_options().get_session_config_entry(KEY) == "1"


def test_thread_budget_from_the_environment(monkeypatch):
    """$QWEN3_COMPILE_ORT_THREADS sets the sessions' intra-op threads when the caller names none; an
    explicit count wins; a value that is not a positive whole number is refused naming the variable."""
    monkeypatch.setenv(THREADS_ENV, "3")
    assert session_options().intra_op_num_threads == 3
    assert session_options(threads=2).intra_op_num_threads == 2
    monkeypatch.delenv(THREADS_ENV)
    assert session_options().intra_op_num_threads == 0  # ORT's own default
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(BadInputError, match=THREADS_ENV):
            session_options()
