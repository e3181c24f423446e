"""Artifact folders that hold only a manifest: what the bundle's refusals read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qwen3_compile.schema import encode
from qwen3_compile.storage.manifests import (
    ExportManifest,
    FileRecord,
    GraphOptions,
    QuantizationTotals,
    QuantizeManifest,
    QuantizeOptions,
    SourceRecord,
)


def write_artifact_manifest(folder: Path, arch, recipe: str | None, dtype: str = "fp16") -> Path:
    """A quantize/export folder holding only its manifest (and an empty model.onnx): what the refusals read
    before any work, so a 30B model needs no export."""
    from qwen3_compile.quantize.recipe import load_recipe

    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"")
    empty = FileRecord(sha256=hashlib.sha256(b"").hexdigest(), bytes=0)
    common = dict(
        tools={},
        outputs={"model.onnx": empty},
        timings_s={},
        architecture=arch.to_hf_dict(),
    )
    graph = dict(dtype=dtype, opset=21, max_positions=arch.max_position_embeddings)
    if recipe:
        manifest = QuantizeManifest(
            **common,
            inputs=SourceRecord(artifact="export", stage="export", model_sha256=empty.sha256),
            options=QuantizeOptions(**graph),
            recipe=load_recipe(recipe).to_dict(),
            quantization=QuantizationTotals(quantized_tensors=0, float_bytes=0, quantized_bytes=0),
        )
    else:
        manifest = ExportManifest(**common, inputs={}, options=GraphOptions(**graph), op_histogram={})
    (folder / "manifest.json").write_text(json.dumps(encode(manifest)))
    return folder
