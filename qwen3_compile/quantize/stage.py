"""The `quantize` stage: an exported (canonical) artifact + a recipe -> a QDQ artifact with manifest.

Order: check the recipe against the deployment target; calibrate layer by layer when the recipe
quantizes activations or the KV cache; fold SmoothQuant scales; quantize weights; insert activation and
KV-cache Q/DQ. The recipe, its accuracy gates and the calibration
summary go into the manifest (`validate` holds the artifact to the recipe's gates); the ranges go to
`calibration.safetensors`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qwen3_compile.backends.onnxruntime.settings import ORT_QDQ
from qwen3_compile.errors import BadInputError
from qwen3_compile.export.stage import MODEL_FILE
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.quantize.activations import insert_activation_qdq
from qwen3_compile.quantize.awq import AwqSearch
from qwen3_compile.quantize.awq_fold import awq_transforms
from qwen3_compile.quantize.calibrate import CalibrationStats, calibrate
from qwen3_compile.quantize.calibration_data import load_calibration
from qwen3_compile.quantize.int4 import check_int4_model
from qwen3_compile.quantize.recipe import QuantRecipe, load_recipe
from qwen3_compile.quantize.smoothquant import smoothquant_transforms
from qwen3_compile.quantize.weight_store import WeightStore, open_sink
from qwen3_compile.quantize.weights import quantize_weights, selected
from qwen3_compile.storage.artifact_dir import (
    atomic_output_dir,
    check_not_an_input,
    copy_side_files,
    load_graph,
    save_onnx,
)
from qwen3_compile.storage.manifest import (
    CALIBRATION_FILE,
    MANIFEST,
    Timings,
    read_manifest,
    read_manifest_as,
    sha256_file,
    verify_outputs,
    write_manifest,
)
from qwen3_compile.storage.manifests import (
    AnyManifest,
    QuantizationTotals,
    QuantizedTensor,
    QuantizeManifest,
    QuantizeOptions,
    SourceRecord,
)


@dataclass(frozen=True)
class QuantizedArtifact:
    directory: Path
    recipe: QuantRecipe
    manifest: QuantizeManifest = field(repr=False)

    @property
    def tensors(self) -> list[QuantizedTensor]:
        """Each weight the recipe quantized (empty for folders written before the manifest listed them)."""
        return list(self.manifest.tensors)

    @property
    def warnings(self) -> list[str]:
        return list(self.manifest.warnings)

    @property
    def weight_ratio(self) -> float:
        """Quantized bytes (values + scales) over the same weights in fp16 (the manifest's totals, which
        folders written before the per-tensor list also carry)."""
        totals = self.manifest.quantization
        return totals.quantized_bytes / max(totals.float_bytes / 2, 1)

    @classmethod
    def from_folder(cls, folder: str | Path) -> QuantizedArtifact:
        """What `quantize_artifact` returned for `folder`, read back from its manifest."""
        folder = Path(folder)
        manifest = read_manifest_as(folder, QuantizeManifest)
        recipe = QuantRecipe.from_dict(manifest.recipe, str(folder / MANIFEST))
        return cls(folder, recipe, manifest)


def _check_input(artifact: Path, manifest: AnyManifest, recipe: QuantRecipe) -> None:
    if manifest.stage != "export":
        raise BadInputError(
            f"quantize takes an exported artifact; this is a '{manifest.stage}' artifact.",
            file=artifact / MANIFEST,
            field="stage",
            fix="run `qwen3-compile export MODEL -o DIR` and quantize DIR.",
        )
    verify_outputs(artifact, manifest, (MODEL_FILE,))
    if manifest.imported is not None:
        raise BadInputError(
            "this export already holds the checkpoint's own quantized weights "
            f"({manifest.imported['label']}); quantizing them again would round them twice.",
            file=artifact / MANIFEST,
            field="imported",
            fix="use the export as it is (lower, build or bundle it), or quantize an export of the BF16 "
            "release.",
        )
    dtype = manifest.options.dtype
    if dtype not in ("fp32", "fp16"):
        raise BadInputError(
            f"quantize reads fp32 or fp16 exports; this one is {dtype}.",
            file=artifact / MANIFEST,
            field="options.dtype",
            fix="export with --dtype fp32 (the ONNX Runtime CPU reference) or fp16 (TensorRT).",
        )
    if recipe.weights.dtype == "fp16" and dtype != "fp16":
        raise BadInputError(
            f"the fp16 baseline recipe keeps an fp16 export as it is; this export is {dtype}.",
            file=artifact / MANIFEST,
            field="options.dtype",
            fix="export with --dtype fp16 and apply the fp16 recipe to that folder.",
        )


def _check_stats(stats: CalibrationStats, recipe: QuantRecipe, tensors: list[QuantizedTensor]) -> list[str]:
    """Every quantized weight's input needs a finite, non-zero range; unreached experts are warnings."""
    for t in tensors if recipe.activations else []:
        layer = int(t.name.split(".")[2])
        amax = stats.layers[layer].act_amax.get(t.name)
        if amax is None or not np.isfinite(amax).all() or amax.max() <= 0:
            if amax is None:
                what = "no token"
            elif not np.isfinite(amax).all():
                what = "non-finite values (NaN/Inf)"
            else:
                what = "only zeros"
            raise BadInputError(
                f"calibration saw {what} at the input of {t.name} (layer {layer}).",
                field="--calibration",
                fix="check the checkpoint for NaN/Inf (`qwen3-compile inspect MODEL`) and use calibration "
                "text that reaches every layer (or the built-in set).",
            )
    for i, s in enumerate(stats.layers):
        if recipe.kv_cache and not (np.isfinite([s.key_amax, s.value_amax]).all() and s.key_amax > 0):
            raise BadInputError(
                f"KV-cache calibration of layer {i} gave key/value ranges {s.key_amax}/{s.value_amax}.",
                field="--calibration",
                fix="check the checkpoint for NaN/Inf (`qwen3-compile inspect MODEL`).",
            )
    return [
        f"layer {layer}: calibration routed no token to experts {experts}; their shared activation range "
        "comes from the other experts (use more or more varied --calibration text)"
        for layer, experts in stats.unreached_experts().items()
    ]


def _awq_search(arch: Qwen3Arch, recipe: QuantRecipe) -> AwqSearch | None:
    if recipe.awq is None:
        return None
    awq = recipe.awq
    return AwqSearch(arch, awq.grid, recipe.weights.group_size, awq.max_search_tokens, awq.clip_grid)


def _check_target(recipe: QuantRecipe, target: str | None) -> None:
    """The recipe must run on the deployment target (checked before any work)."""
    if target is None:
        return
    from qwen3_compile.quantize.compat import check_recipe_target
    from qwen3_compile.targets import get_target

    check_recipe_target(recipe, get_target(target))


def quantize_artifact(
    artifact: str | Path,
    recipe: str | Path | QuantRecipe,
    output: str | Path,
    force: bool = False,
    target: str | None = None,
    calib: str | Path | None = None,
    samples: int | None = None,
    progress: Progress = NO_PROGRESS,
    ort_qdq: str = "reference",
) -> QuantizedArtifact:
    """Quantize an fp32 or fp16 canonical export. `target`: a deployment device the recipe must fit
    (checked before any work); lowering for a runtime is the `lower` stage's.
    `ort_qdq`: how ONNX Runtime runs the QDQ graph, recorded in the manifest: `reference` (as written, the
    recipe's numbers) or `fused` (ORT's int8 fusions: backends/onnxruntime/settings.py)."""
    if ort_qdq not in ORT_QDQ:
        raise BadInputError(
            f"unknown ONNX Runtime QDQ mode {ort_qdq!r}.",
            field="--ort-qdq",
            fix=f"choose one of {', '.join(ORT_QDQ)}.",
        )
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    recipe = recipe if isinstance(recipe, QuantRecipe) else load_recipe(recipe)
    _check_input(artifact, manifest, recipe)
    check_not_an_input(Path(output), [artifact])
    _check_target(recipe, target)
    arch = Qwen3Arch.from_config_file(artifact / "config.json")
    timings = Timings()
    with timings.stage("load"):  # the graph only: weights are read one tensor at a time
        model = load_graph(artifact / MODEL_FILE)
        store = WeightStore(model, artifact)
    check_int4_model(model, recipe, lambda proto: selected(proto, recipe))  # before any work
    stats, calibration, warnings, awq = None, None, [], None
    if recipe.needs_calibration:
        from qwen3_compile.tokenizer import load_tokenizer

        spec = recipe.calibration_spec
        with timings.stage("calibrate"):
            texts = load_calibration(
                load_tokenizer(artifact), calib, samples or spec.samples, spec.max_tokens
            )
            awq = _awq_search(arch, recipe)
            stats = calibrate(arch, store.array, texts, progress, on_layer=awq)
            if awq is not None:
                stats.awq = awq.scales
        calibration = stats.summary()
    with atomic_output_dir(Path(output), force) as tmp:
        sink = open_sink(store, tmp / f"{MODEL_FILE}.data")
        smoothing, transforms = None, {}
        with timings.stage("quantize"):
            if recipe.smoothquant is not None:
                transforms, smoothing = smoothquant_transforms(store, arch, recipe, stats)
            if awq is not None:
                transforms = awq_transforms(arch, awq.scales)
            tensors = quantize_weights(model, recipe, store, sink, transforms)
            if not tensors and recipe.weights.dtype != "fp16":
                raise BadInputError(
                    f"recipe '{recipe.name}' selects no weight of this model.",
                    file=recipe.source,
                    field="select",
                    fix="check the include/skip patterns against the checkpoint names.",
                )
            if stats is not None:
                warnings = _check_stats(stats, recipe, tensors)
                act_dtype = recipe.activations.dtype if recipe.activations else None
                kv_dtype = recipe.kv_cache.dtype if recipe.kv_cache else None
                float_dtype = np.float16 if manifest.options.dtype == "fp16" else np.float32
                calibration |= insert_activation_qdq(model, stats, act_dtype, kv_dtype, float_dtype)
        sink.close()
        with timings.stage("write"):
            save_onnx(model, tmp / MODEL_FILE)
            copy_side_files(artifact, tmp, skip=(MODEL_FILE, MANIFEST, CALIBRATION_FILE))
            if stats is not None:
                stats.save(tmp / CALIBRATION_FILE)
        written = write_manifest(
            tmp,
            QuantizeManifest,
            timings,
            inputs=SourceRecord(
                artifact=str(artifact),
                stage="export",
                model_sha256=manifest.outputs[MODEL_FILE].sha256,
                manifest_sha256=sha256_file(artifact / MANIFEST),
                source=manifest.inputs,
            ),
            options=QuantizeOptions(**asdict(manifest.options), target=target),
            architecture=manifest.architecture,
            recipe=recipe.to_dict(),
            quantization=QuantizationTotals(
                quantized_tensors=len(tensors),
                float_bytes=sum(t.float_bytes for t in tensors),
                quantized_bytes=sum(t.quantized_bytes for t in tensors),
            ),
            tensors=tuple(tensors),
            calibration=calibration,
            smoothquant=smoothing,
            awq=awq.manifest_summary() if awq is not None else None,
            warnings=tuple(warnings),
            # how ORT must run this graph (backends/onnxruntime/settings.py says why)
            ort_optimization="basic" if "fp8" in recipe.precisions else "all",
            ort_session_config=dict(ORT_QDQ[ort_qdq]),
        )
    return QuantizedArtifact(Path(output), recipe, written)
