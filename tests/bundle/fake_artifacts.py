"""Artifact folders that hold only a manifest: what the bundle's refusals read."""

from __future__ import annotations

import json
from pathlib import Path


def write_artifact_manifest(folder: Path, arch, recipe: str | None, dtype: str = "fp16") -> Path:
    """A quantize/export folder holding only its manifest (and an empty model.onnx): what the refusals read
    before any work, so a 30B model needs no export."""
    from qwen3_compile.quantize.recipe import load_recipe

    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"")
    manifest = {
        "stage": "quantize" if recipe else "export",
        "options": {"dtype": dtype},
        "architecture": arch.to_hf_dict(),
        "recipe": load_recipe(recipe).to_dict() if recipe else None,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder
