"""The `build` stage: an exported or quantized artifact + a deployment target -> a TensorRT plan.

Order: every check that needs no TensorRT first (artifact, target, recipe/target, memory fit), then the
TensorRT import, the MoE lowering, the parse and the build. The output folder is written atomically:
`model.plan`, `build.log`, the tokenizer and config side files, `manifest.json`. A failed build leaves
no folder and copies its log next to where the folder would have been.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_compile.backends.tensorrt.profiles import InputSpec, generation_profiles
from qwen3_compile.backends.tensorrt.shim import import_tensorrt
from qwen3_compile.engine.inputs import MODEL_FILE, check_target_supports, int4_experts, read_build_input
from qwen3_compile.engine.log import build_log
from qwen3_compile.engine.memory import check_fits, plan_engine_memory, stored_weight_bytes
from qwen3_compile.engine.network import load_plugin_libraries, parse_onnx
from qwen3_compile.engine.plan import build_plan
from qwen3_compile.errors import BadInputError, Qwen3CompileError
from qwen3_compile.lower.for_tensorrt import check_requested_lowering, choose_moe_lowering, lower_for_build
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.storage.artifact_dir import atomic_output_dir, copy_side_files
from qwen3_compile.storage.manifest import CALIBRATION_FILE, MANIFEST, Timings, sha256_file, write_manifest
from qwen3_compile.storage.manifests import (
    EngineManifest,
    EngineOptions,
    MemoryRecord,
    MoeRecord,
    PlanRecord,
    SourceRecord,
    TargetRecord,
    TensorRTRecord,
)
from qwen3_compile.targets import get_target

PLAN_FILE = "model.plan"
LOG_FILE = "build.log"
DEFAULT_MAX_SEQ = 4096


@dataclass(frozen=True)
class BuildOptions:
    target: str
    max_batch: int = 1
    max_seq: int | None = None  # default: the model's max positions, at most 4096
    moe_lowering: str | None = None  # default: the target's first usable one
    plugins: tuple[Path, ...] = ()
    # default: one per flavour, version and SM under ~/.cache for standard TensorRT; none for TensorRT-RTX,
    # whose ahead-of-time build times no tactics (its cache stays empty: 0 entries, measured)
    timing_cache: Path | None = None
    optimization_level: int | None = None  # TensorRT's builder optimisation level (default 3)
    # "all": logits at every position (the validation graph: validate compares every position);
    # "last": the deployment graph, logits of the newest token only
    logits: str = "all"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "max_batch": self.max_batch,
            "max_seq": self.max_seq,
            "moe_lowering": self.moe_lowering,
            "plugins": [str(p) for p in self.plugins],
            "optimization_level": self.optimization_level,
            "logits": self.logits,
        }


@dataclass(frozen=True)
class BuiltEngine:
    directory: Path
    manifest: EngineManifest = field(repr=False)

    @property
    def plan_path(self) -> Path:
        return self.directory / PLAN_FILE

    @property
    def plan_bytes(self) -> int:
        return self.manifest.engine.bytes

    @property
    def build_seconds(self) -> float:
        return self.manifest.engine.build_s

    @property
    def moe_lowering(self) -> str:
        return self.manifest.moe.lowering


def default_timing_cache(flavour: str, version: str, sm: str) -> Path:
    root = Path(os.environ.get("QWEN3_COMPILE_CACHE", Path.home() / ".cache" / "qwen3_compile"))
    return root / "timing" / f"{flavour}-{version}-sm{sm.replace('.', '')}.cache"


def build_engine(
    artifact: str | Path,
    options: BuildOptions,
    output: str | Path,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> BuiltEngine:
    """Build a TensorRT plan of `artifact` for `options.target` into `output` (see the module doc)."""
    output = Path(output)
    build_input = read_build_input(artifact)
    target = get_target(options.target)
    check_target_supports(build_input, target)
    arch = build_input.arch
    max_seq = options.max_seq or min(arch.max_position_embeddings, DEFAULT_MAX_SEQ)
    memory = plan_engine_memory(
        arch,
        target,
        stored_weight_bytes(build_input.model_path),
        options.max_batch,
        max_seq,
        kv_bytes=4 if build_input.dtype == "fp32" else 2,
        all_logits=options.logits == "all",
    )
    check_fits(memory, target, options.max_batch, max_seq)
    trt = import_tensorrt(target.tensorrt, target.min_tensorrt, purpose=f"target {target.name}")
    choice = choose_moe_lowering(arch, target, trt, options.moe_lowering, options.plugins)
    timing_cache = options.timing_cache
    if timing_cache is None and trt.__name__ == "tensorrt":
        timing_cache = default_timing_cache(target.tensorrt, trt.__version__, target.sm)
    timings = Timings()
    with atomic_output_dir(output, force) as tmp:
        try:
            # scratch inside the partial output: on the output's file system, so weights hard-link there
            with (
                tempfile.TemporaryDirectory(prefix=".lowered-", dir=tmp) as scratch,
                build_log(trt, tmp / LOG_FILE) as log,
            ):
                log.note(
                    f"{build_input.directory} ({build_input.label}) -> {target.name} "
                    f"with {trt.__name__} {trt.__version__}"
                )
                log.note(f"memory plan: {memory.describe()}")
                log.note(f"MoE lowering: {choice.lowering}; skipped: {choice.skipped or 'none'}")
                with timings.stage("lower"):
                    lowered = lower_for_build(
                        build_input.model_path, choice, Path(scratch), last_logits=options.logits == "last"
                    )
                log.note(f"lowering report: {lowered.report}; MoE as built: {lowered.moe}")
                check_requested_lowering(lowered, options.moe_lowering)
                if int4_experts(build_input):
                    _check_int4_lowered(build_input, lowered.moe)
                plugin_hashes = load_plugin_libraries(trt, list(options.plugins), log)
                with timings.stage("parse"):
                    parsed = parse_onnx(trt, lowered.path, log)
                profiles = generation_profiles(
                    [InputSpec(n, s) for n, s in parsed.inputs()], options.max_batch, max_seq
                )
                with timings.stage("build"):
                    plan = build_plan(
                        trt, parsed, target, profiles, timing_cache, log, options.optimization_level, progress
                    )
                del parsed  # the parser's copy of the weights: not needed to write the plan
                with timings.stage("write"):
                    (tmp / PLAN_FILE).write_bytes(plan.data)
                    # tokenizer and configs; not the graph, its data, the manifest or calibration data
                    copy_side_files(build_input.directory, tmp, skip=(MODEL_FILE, MANIFEST, CALIBRATION_FILE))
                log.note(f"wrote {PLAN_FILE}: {plan.nbytes} bytes")
        except (Qwen3CompileError, KeyboardInterrupt) as err:
            _keep_log(tmp, output, err)
            raise
        source = build_input.manifest
        manifest = write_manifest(
            tmp,
            EngineManifest,
            timings,
            inputs=SourceRecord(
                artifact=str(build_input.directory),
                stage=source.stage,
                model_sha256=source.outputs[MODEL_FILE].sha256,
                manifest_sha256=sha256_file(build_input.directory / MANIFEST),
                source=source.inputs if source.stage == "export" else source.inputs.source,
            ),
            options=EngineOptions(
                dtype=source.options.dtype,
                opset=source.options.opset,
                max_positions=source.options.max_positions,
                target=options.target,
                max_batch=options.max_batch,
                max_seq=max_seq,
                moe_lowering=options.moe_lowering,
                plugins=tuple(str(p) for p in options.plugins),
                logits=options.logits,
                optimization_level=options.optimization_level,
            ),
            architecture=source.architecture,
            recipe=getattr(source, "recipe", None),
            tensorrt=TensorRTRecord(flavour=target.tensorrt, module=trt.__name__, version=trt.__version__),
            target=TargetRecord(name=target.name, sm=target.sm, description=target.description),
            profiles=tuple(p.to_dict() for p in profiles),
            moe=MoeRecord(**dataclasses.asdict(lowered.moe)),
            attention=target.attention,
            lowering=lowered.report,
            op_histogram=lowered.op_histogram,
            plugins=plugin_hashes,
            memory=MemoryRecord(**memory.to_dict()),
            timing_cache=str(timing_cache) if timing_cache else None,
            engine=PlanRecord(file=PLAN_FILE, bytes=plan.nbytes, build_s=round(plan.seconds, 3)),
        )
    return BuiltEngine(output, manifest)


def _keep_log(tmp: Path, output: Path, err: BaseException) -> None:
    """The partial folder is about to go: keep its build.log beside where the output would have been."""
    if not (tmp / LOG_FILE).exists():
        return
    kept = output.parent / f"{output.name}.failed-build.log"
    shutil.copyfile(tmp / LOG_FILE, kept)
    if isinstance(err, Qwen3CompileError):
        err.problem += f" (build log: {kept})"


def _check_int4_lowered(build_input, moe) -> None:
    """INT4 experts that did not all reach the plugin would be lowered densely, which crashes TensorRT-RTX
    1.7.1's builder (engine/inputs.py): an error before the parse instead."""
    dense = moe.lowering != "plugin" or "dense_for" in moe.skipped
    if not dense:
        return
    why = moe.skipped.get("dense_for") or next(iter(moe.skipped.values()), moe.lowering)
    raise BadInputError(
        f"INT4 experts must all be lowered to the qmoe plugin; the MoE lowering is {moe.lowering}: {why}.",
        file=build_input.directory / MODEL_FILE,
        field="--moe-lowering",
        fix="build with the plugin (the target's default, or --moe-lowering plugin), or quantize the experts "
        "with int8-wo.",
    )
