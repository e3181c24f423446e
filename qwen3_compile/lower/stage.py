"""The `lower` stage: an export or quantize folder rewritten for one runtime (and, for TensorRT, one
deployment target) into a new artifact folder with its own manifest.

- `ort`: ExpertDispatch -> `com.microsoft::MoE` (float experts) or `QMoE` (INT8 weight-only experts; INT4
  experts with block-wise scales under onnxruntime >= 1.24), INT4 DequantizeLinear -> MatMul ->
  `MatMulNBits` (fp32/fp16 activations); nodes a rule declines keep their reference body, with the reason
  recorded. `attention="gqa"`: each layer's attention -> `com.microsoft::GroupQueryAttention` (ort_gqa.py),
  which a runner can feed a static KV cache.
- `tensorrt`: the target's MoE lowering (its `moe_lowerings` order, TRT_MoE / plugin / dense), chosen for
  the TensorRT installed here, else for the target's minimum TensorRT (as a bundle does); imported
  asymmetric linears (AWQ, GPTQ with zero points) to signed weights plus a block-sum term
  (trt_zero_points.py).
`build` and `bundle` call the same rules on their own scratch copy.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import types
from dataclasses import dataclass, field
from pathlib import Path

from qwen3_compile.errors import BadInputError
from qwen3_compile.lower.files import rewrite_file
from qwen3_compile.lower.for_tensorrt import MoeChoice, choose_moe_lowering, lower_for_build
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.storage.artifact_dir import atomic_output_dir, check_not_an_input, copy_side_files
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
    ExportManifest,
    LoweringRecord,
    LowerManifest,
    LowerOptions,
    MoeRecord,
    QuantizeManifest,
    SourceRecord,
)
from qwen3_compile.targets import Target, get_target

MODEL_FILE = "model.onnx"
RUNTIMES = ("ort", "tensorrt")
LOWERABLE_STAGES = ("export", "quantize")

# ONNX Runtime's MoE choices: its own MoE/QMoE operators (the default), or ExpertDispatch kept for the
# project's custom-op library (`--ort-ops libqmoe_ort.so`, plugins/README.md)
ORT_MOE_LOWERINGS = ("ort-moe", "custom-op")
# ONNX Runtime's attention: as exported, or GroupQueryAttention (lower/ort_gqa.py)
ATTENTIONS = ("standard", "gqa")
LOGITS = ("all", "last")  # every position (validation graphs) or the last (deployment graphs)


@dataclass(frozen=True)
class LoweredArtifact:
    directory: Path
    runtime: str
    target: str | None
    report: LoweringRecord
    op_histogram: dict[str, int]
    moe: MoeChoice | None  # the TensorRT MoE lowering; None for ONNX Runtime
    manifest: LowerManifest = field(repr=False)

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @classmethod
    def from_folder(cls, folder: str | Path) -> LoweredArtifact:
        """What `lower_artifact` returned for `folder`, read back from its manifest."""
        manifest = read_manifest_as(Path(folder), LowerManifest)
        lowering = manifest.lowering
        moe = MoeChoice(**dataclasses.asdict(lowering.moe)) if lowering.moe else None
        histogram = manifest.op_histogram
        return cls(Path(folder), lowering.runtime, lowering.target, lowering, histogram, moe, manifest)


def _read_source(artifact: Path) -> ExportManifest | QuantizeManifest:
    manifest = read_manifest(artifact)
    stage = manifest.stage
    if isinstance(manifest, LowerManifest):
        source = manifest.inputs.artifact
        raise BadInputError(
            "this folder is already lowered; lowering starts from the canonical graph.",
            file=artifact / MANIFEST,
            field="stage",
            fix=f"lower the export or quantize folder it came from ({source}).",
        )
    if stage not in LOWERABLE_STAGES:
        raise BadInputError(
            f"lower takes an export or quantize folder; this is a '{stage}' artifact.",
            file=artifact / MANIFEST,
            field="stage",
            fix="run `qwen3-compile export MODEL -o DIR` (then optionally `quantize`) and lower that folder.",
        )
    verify_outputs(artifact, manifest, (MODEL_FILE,))
    return manifest


def _check_disk(artifact: Path, output: Path, manifest: ExportManifest | QuantizeManifest) -> None:
    """The lowered folder needs at most the rewritten experts (no larger than the graph's data) and, where
    the source's data cannot be hard-linked (another file system), a copy of it."""
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    data = sum(r.bytes for name, r in manifest.outputs.items() if name.startswith(MODEL_FILE))
    needed = data if os.stat(parent).st_dev == os.stat(artifact).st_dev else 2 * data
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise BadInputError(
            f"not enough free disk: lowering needs up to {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free.",
            file=parent,
            field="--output",
            fix="free disk space, or lower onto the artifact's own disk (its weights are then linked).",
        )


def _tensorrt_choice(arch: Qwen3Arch, target: Target, requested: str | None) -> MoeChoice:
    """The build's choice where the target's TensorRT is installed; else the choice for a device running
    the target's minimum TensorRT, the plugin being a library built there (what a bundle ships)."""
    from qwen3_compile.backends.tensorrt.shim import flavour, import_tensorrt

    if flavour(target.tensorrt).available():
        trt = import_tensorrt(target.tensorrt, target.min_tensorrt, purpose=f"target {target.name}")
        return choose_moe_lowering(arch, target, trt, requested)
    oldest = types.SimpleNamespace(__name__="tensorrt", __version__=target.min_tensorrt)
    choice = choose_moe_lowering(arch, target, oldest, requested, (Path("libqmoe_trt_plugin.so"),))
    why = f" (chosen for {target.name}'s minimum TensorRT {target.min_tensorrt}; none is installed here)"
    return dataclasses.replace(choice, skipped={k: v + why for k, v in choice.skipped.items()})


def _lower(
    runtime: str,
    choice: MoeChoice | None,
    model_path: Path,
    out_dir: Path,
    moe_lowering: str | None = None,
    attention: str = "standard",
    max_positions: int | None = None,
    logits: str = "all",
) -> tuple[dict, dict, MoeChoice | None]:
    """(rewrite report, op histogram, the MoE lowering the graph got) of the lowered copy in `out_dir`."""
    if runtime == "ort":
        from qwen3_compile.lower import make_rules

        rule_set = "ort-custom-op" if moe_lowering == "custom-op" else "ort"
        rule_set += "-gqa" if attention == "gqa" else ""
        # an explicit ort-moe also lowers fp16 experts (ORT's CUDA MoE; its CPU kernel is fp32-only)
        rules = make_rules(rule_set, max_positions=max_positions, half_experts=moe_lowering == "ort-moe")
        rules += make_rules("ort-last-logits") if logits == "last" else []
        graph = rewrite_file(model_path, rules, out_dir, what=rule_set)
        return graph.report.to_dict(), graph.op_histogram, None
    lowered = lower_for_build(model_path, choice, out_dir, logits == "last", keep_input=False)
    return lowered.report, lowered.op_histogram, lowered.moe


def lower_artifact(
    artifact: str | Path,
    output: str | Path,
    runtime: str,
    *,
    target: str | None = None,
    moe_lowering: str | None = None,
    attention: str = "standard",
    logits: str = "all",
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> LoweredArtifact:
    """Write `output`: the graph of `artifact` (an export or quantize folder) lowered for `runtime`.
    `logits="last"`: a deployment graph whose logits are the last position's only (`run` takes it,
    `validate` refuses it: it compares every position)."""
    artifact, output = Path(artifact), Path(output)
    if runtime not in RUNTIMES:
        raise BadInputError(
            f"unknown runtime '{runtime}'.", field="--for", fix=f"use one of: {', '.join(RUNTIMES)}."
        )
    if runtime == "tensorrt" and target is None:
        raise BadInputError(
            "a TensorRT lowering depends on the device (its MoE lowering and TensorRT version).",
            field="--target",
            fix="name the deployment target, e.g. --target jetson-agx-orin.",
        )
    if moe_lowering is not None and (runtime == "ort") != (moe_lowering in ORT_MOE_LOWERINGS):
        raise BadInputError(
            f"--moe-lowering {moe_lowering} is not a lowering for {runtime}: ONNX Runtime takes "
            f"{', '.join(ORT_MOE_LOWERINGS)}, TensorRT the others.",
            field="--moe-lowering",
            fix="drop it, or pick one for the runtime given with --for.",
        )
    if attention not in ATTENTIONS or (attention == "gqa" and runtime != "ort"):
        raise BadInputError(
            f"--attention {attention} is not an attention lowering for {runtime}: ONNX Runtime takes "
            f"{', '.join(ATTENTIONS)}; TensorRT keeps the exported attention.",
            field="--attention",
            fix="drop it, or use --for ort.",
        )
    if logits not in LOGITS:
        raise BadInputError(
            f"unknown --logits {logits!r}.", field="--logits", fix=f"use one of: {', '.join(LOGITS)}."
        )
    chosen_target = get_target(target) if target else None
    check_not_an_input(output, [artifact])
    manifest = _read_source(artifact)
    _check_disk(artifact, output, manifest)
    arch = Qwen3Arch.from_hf_dict(manifest.architecture, source=artifact / MANIFEST)
    choice = _tensorrt_choice(arch, chosen_target, moe_lowering) if runtime == "tensorrt" else None
    timings = Timings()
    with atomic_output_dir(output, force) as tmp:
        with timings.stage("lower"), progress.stage(f"lower for {runtime}", total=None):
            report, histogram, moe = _lower(
                runtime,
                choice,
                artifact / MODEL_FILE,
                tmp,
                moe_lowering,
                attention,
                manifest.options.max_positions,
                logits,
            )
        copy_side_files(artifact, tmp, skip=(MODEL_FILE, MANIFEST, CALIBRATION_FILE))
        lowering = LoweringRecord(
            runtime=runtime,
            target=target,
            moe=MoeRecord(**dataclasses.asdict(moe)) if moe else None,
            applied=report["applied"],
            declined={rule: tuple(reasons) for rule, reasons in report["declined"].items()},
        )
        quantized = isinstance(manifest, QuantizeManifest)
        record = write_manifest(
            tmp,
            LowerManifest,
            timings,
            inputs=SourceRecord(
                artifact=str(artifact),
                stage=manifest.stage,
                model_sha256=manifest.outputs[MODEL_FILE].sha256,
                manifest_sha256=sha256_file(artifact / MANIFEST),
                source=manifest.inputs if isinstance(manifest, ExportManifest) else manifest.inputs.source,
            ),
            options=LowerOptions(
                dtype=manifest.options.dtype,
                opset=manifest.options.opset,
                max_positions=manifest.options.max_positions,
                runtime=runtime,
                target=target,
                moe_lowering=moe_lowering,
                attention=attention,
                logits=logits,
            ),
            architecture=manifest.architecture,
            op_histogram=histogram,
            lowering=lowering,
            recipe=manifest.recipe if quantized else None,
            quantization=manifest.quantization if quantized else None,
            calibration=manifest.calibration if quantized else None,
            ort_optimization=manifest.ort_optimization,  # quantized or imported: how ORT runs the QDQ graph
            ort_session_config=manifest.ort_session_config,
        )
    return LoweredArtifact(output, runtime, target, lowering, histogram, moe, record)
