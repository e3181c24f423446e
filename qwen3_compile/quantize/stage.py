"""The `quantize` stage: an exported (canonical) artifact + a recipe -> a QDQ artifact with manifest.

Implemented recipes: weight-only (`int8-wo`). The recipe and its accuracy gates go into the manifest,
so `validate` holds the quantized artifact to the recipe's own gates.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from qwen3_compile.artifact_io import atomic_output_dir, save_onnx
from qwen3_compile.errors import BadInputError
from qwen3_compile.export.stage import MODEL_FILE
from qwen3_compile.manifest import MANIFEST, Timings, read_manifest, sha256_file, write_manifest
from qwen3_compile.quantize.recipe import QuantRecipe, load_recipe
from qwen3_compile.quantize.weights import QuantizedTensor, quantize_weights


@dataclass(frozen=True)
class QuantizedArtifact:
    directory: Path
    recipe: QuantRecipe
    tensors: list[QuantizedTensor]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def weight_ratio(self) -> float:
        """Quantized bytes (values + scales) over the same weights in fp16."""
        return sum(t.quantized_bytes for t in self.tensors) / max(
            sum(t.float_bytes for t in self.tensors) / 2, 1
        )


def _check_input(artifact: Path, manifest: dict) -> None:
    if manifest.get("stage") != "export" or not (artifact / MODEL_FILE).exists():
        raise BadInputError(
            f"quantize takes an exported artifact; this is a '{manifest.get('stage')}' artifact.",
            file=artifact / MANIFEST,
            field="stage",
            fix="run `qwen3-compile export MODEL -o DIR` and quantize DIR.",
        )
    options = manifest.get("options", {})
    if options.get("target"):
        raise BadInputError(
            f"the artifact is already lowered for '{options['target']}'.",
            file=artifact / MANIFEST,
            field="options.target",
            fix="quantize the canonical export (no --target).",
        )
    if options.get("dtype") != "fp32":
        raise BadInputError(
            f"quantize reads fp32 exports; this one is {options.get('dtype')}.",
            file=artifact / MANIFEST,
            field="options.dtype",
            fix="export with --dtype fp32 (the default), then quantize.",
        )


def quantize_artifact(
    artifact: str | Path,
    recipe: str | Path | QuantRecipe,
    output: str | Path,
    force: bool = False,
    target: str | None = None,
) -> QuantizedArtifact:
    """Quantize an fp32 canonical export; with `target`, lower the result for that backend (ort: INT8
    experts to QMoE)."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    _check_input(artifact, manifest)
    recipe = recipe if isinstance(recipe, QuantRecipe) else load_recipe(recipe)
    timings = Timings()
    with timings.stage("load"):
        model = onnx.load(str(artifact / MODEL_FILE))
    with timings.stage("quantize"):
        tensors = quantize_weights(model, recipe)
    lowering = None
    if target is not None:
        from qwen3_compile.lower import lower

        with timings.stage("lower"):
            lowering = lower(model, target).to_dict()
    if not tensors:
        raise BadInputError(
            f"recipe '{recipe.name}' selects no weight of this model.",
            file=recipe.source,
            field="select",
            fix="check the include/skip patterns against the checkpoint names.",
        )
    with atomic_output_dir(Path(output), force) as tmp:
        with timings.stage("write"):
            save_onnx(model, tmp / MODEL_FILE)
            for side in sorted(artifact.iterdir()):
                if side.is_file() and not side.name.startswith((MODEL_FILE, MANIFEST)):
                    shutil.copyfile(side, tmp / side.name)
        inputs = {
            "artifact": str(artifact),
            "model_sha256": sha256_file(artifact / MODEL_FILE),
            "source": manifest.get("inputs"),
        }
        stats = {
            "quantized_tensors": len(tensors),
            "float_bytes": sum(t.float_bytes for t in tensors),
            "quantized_bytes": sum(t.quantized_bytes for t in tensors),
        }
        written = write_manifest(
            tmp,
            "quantize",
            inputs,
            manifest.get("options", {}) | {"target": target},
            timings,
            {
                "architecture": manifest.get("architecture"),
                "recipe": recipe.to_dict(),
                "quantization": stats,
                "lowering": lowering,
            },
        )
    return QuantizedArtifact(Path(output), recipe, tensors, written)
