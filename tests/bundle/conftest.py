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
    manifest: dict  # the archive's manifest.json as the device reads it (JSON, not the typed view)


@pytest.fixture(scope="session")
def validated_int8_sq(artifacts) -> Path:
    """tiny-moe fp32 export -> int8-sq (the shared one, copied: validation writes its report into the folder)
    -> validate; once per run (`Artifacts.once`). fp32, not fp16: the int8-sq artifact of an fp16 export does
    not load in ONNX Runtime (QuantizeLinear gets an fp16 input and an fp32 scale)."""
    folder = artifacts.root / "bundle-inputs" / "int8-sq"

    def make() -> None:
        import shutil

        from qwen3_compile.validate.stage import validate_artifact

        shutil.copytree(artifacts.quantized("tiny-moe", "int8-sq"), folder)
        prompts = folder.parent / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
        report = validate_artifact(
            folder, "tiny-moe", prompts=prompts, decode_steps=8, long_context_tokens=0, bisect=False
        )
        assert report.passed, report.failures

    artifacts.once(("bundle", "validated-int8-sq"), folder, make, sealed=False)
    return folder


@pytest.fixture(scope="session")
def bundled(validated_int8_sq, artifacts) -> Bundled:
    """The validated int8-sq folder bundled for jetson-agx-orin, once per run (`Artifacts.once`)."""
    out = artifacts.root / "bundles" / "tiny-moe-int8-sq-agx-orin.tar.gz"

    def make() -> None:
        from qwen3_compile.bundle import bundle_artifact

        bundle_artifact(validated_int8_sq, "jetson-agx-orin", out)

    def load(archive: Path) -> dict:
        from qwen3_compile.bundle import verify_bundle
        from qwen3_compile.schema import encode

        return encode(verify_bundle(archive).manifest)  # checks every file of the archive on the way

    manifest = artifacts.once(("bundle", "agx-orin"), out, make, load, sealed=False)
    return Bundled(validated_int8_sq, out, manifest)
