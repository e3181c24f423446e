"""A validation report names the graph it validated (sha256 from the artifact's manifest); a bundle refuses
a report that belongs to a different model.onnx."""

from __future__ import annotations

import json

import pytest

from qwen3_compile.bundle.reference import require_validation
from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.manifest import sha256_file
from qwen3_compile.validate.stage import validate_artifact


def test_report_records_and_bundle_checks_the_model_hash(artifacts, artifact_copy, tmp_path):
    artifact = artifact_copy(artifacts.export("tiny-dense"))  # validation and the test write into it
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("Name a prime number.") + "\n")
    validate_artifact(
        artifact, "tiny-dense", prompts=prompts, decode_steps=2, long_context_tokens=0, bisect=False
    )
    report = json.loads((artifact / "validation" / "report.json").read_text())
    assert report["model_sha256"] == sha256_file(artifact / "model.onnx")
    assert require_validation(artifact).passed
    with (artifact / "model.onnx").open("ab") as f:  # a different model next to the old report
        f.write(b"\0")
    with pytest.raises(BadInputError) as info:
        require_validation(artifact)
    assert info.value.field == "model_sha256"
