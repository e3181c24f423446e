"""Slow: an artifact whose weights live in external data (what every real model above 1.8 GB is): the bundle
ships the lowered graph with its data files, and the runner's ONNX Runtime path reproduces the same tokens.
The tiny int8-sq artifact is rewritten with its weights external (same values, so its validation report
still describes it)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from qwen3_compile.schema import encode
from qwen3_compile.storage.manifest import sha256_file

from .test_bundle_end_to_end import run_bundled_runner

pytestmark = pytest.mark.slow


def test_external_data_artifact_bundles_and_runs(validated_int8_sq, tmp_path, reseal):
    from qwen3_compile.bundle import bundle_artifact
    from qwen3_compile.bundle.archive import safe_extract

    artifact = tmp_path / "external"
    shutil.copytree(validated_int8_sq, artifact)
    model = onnx.load(str(artifact / "model.onnx"))
    onnx.save_model(
        model,
        str(artifact / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    assert (artifact / "model.onnx.data").stat().st_size > 0.9 * (
        validated_int8_sq / "model.onnx"
    ).stat().st_size
    reseal(artifact)  # a producer that wrote external data: the manifest lists the files as they are
    # re-saving changed model.onnx's bytes, not its values: stamp the report with the new graph's hash (a
    # report whose hash does not match is refused, see test_report_belongs_to_model.py)
    report_path = artifact / "validation" / "report.json"
    report = json.loads(report_path.read_text())
    report["model_sha256"] = sha256_file(artifact / "model.onnx")
    report_path.write_text(json.dumps(report))

    result = bundle_artifact(artifact, "jetson-agx-orin", tmp_path / "b.tar.gz")
    m = encode(result.manifest)  # as the device reads it
    data_files = sorted(n for n in m["files"] if n.startswith("model/model.") and n.endswith(".data"))
    assert "model/model.onnx.data" in data_files
    folder = tmp_path / "device"
    safe_extract(result.path, folder)
    graph = onnx.load(str(folder / "model" / "model.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    smoke = m["smoke_reference"]
    run = run_bundled_runner(
        folder, "chat", "--backend", "ort", "--no-think", "--greedy", "--json",
        "--max-new-tokens", str(smoke["max_new_tokens"]), "-p", smoke["prompt"],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    inline = encode(
        bundle_artifact(validated_int8_sq, "jetson-agx-orin", tmp_path / "inline.tar.gz").manifest
    )
    # the same weights, stored externally: the same smoke tokens, and the runner reproduces them
    assert smoke["modes"] == inline["smoke_reference"]["modes"]
    assert json.loads(run.stdout)["generated_ids"] == smoke["modes"]["non-thinking"]["tokens"]
