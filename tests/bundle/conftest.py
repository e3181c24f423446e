"""Artifacts the bundle tests share, made once per session: tiny-moe exported, quantized with int8-sq,
validated (two prompts, both modes) and bundled for jetson-agx-orin."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

PROMPTS = [
    {
        "name": "en",
        "category": "multilingual",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
    },
    {
        "name": "code",
        "category": "code",
        "messages": [{"role": "user", "content": "Reverse a string in Python."}],
    },
]


@dataclass(frozen=True)
class Bundled:
    artifact: Path  # the validated int8-sq folder
    archive: Path  # its bundle for jetson-agx-orin
    manifest: dict
    seconds: dict
    sha256: str  # the archive's, as bundle_artifact reported it


@pytest.fixture(scope="session")
def validated_int8_sq(artifacts, tmp_path_factory) -> Path:
    """tiny-moe fp32 export -> int8-sq (the shared one, copied: validation writes its report into the folder)
    -> validate. fp32, not fp16: the int8-sq artifact of an fp16 export does not load in ONNX Runtime
    (QuantizeLinear gets an fp16 input and an fp32 scale)."""
    import shutil

    from qwen3_compile.validate.stage import validate_artifact

    root = tmp_path_factory.mktemp("bundle-inputs")
    shutil.copytree(artifacts.quantized("tiny-moe", "int8-sq"), root / "int8-sq")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    report = validate_artifact(
        root / "int8-sq", "tiny-moe", prompts=prompts, decode_steps=8, long_context_tokens=0, bisect=False
    )
    assert report.passed, report.failures
    return root / "int8-sq"


@pytest.fixture(scope="session")
def bundled(validated_int8_sq, tmp_path_factory) -> Bundled:
    from qwen3_compile.bundle import bundle_artifact
    from qwen3_compile.schema import encode

    out = tmp_path_factory.mktemp("bundles") / "tiny-moe-int8-sq-agx-orin.tar.gz"
    result = bundle_artifact(validated_int8_sq, "jetson-agx-orin", out)
    # the manifest as the device reads it (JSON), not the toolchain's typed view
    return Bundled(validated_int8_sq, out, encode(result.manifest), result.seconds, result.sha256)
