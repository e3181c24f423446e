"""`compile MODEL --target DEVICE`: the smallest artifact that runs on the device and passes its gates.

Plan (from the architecture alone, before loading weights): the recipes considered (all built-in ones,
or `--recipes`), each with its deployed weight size (`sizing.weight_bytes` of the recipe's weight format)
and memory plan at the deployment context (`sizing.plan_memory`: weights + KV cache + activations) against
the target's usable memory. A recipe the target cannot run, or whose plan does not fit, is skipped.

Order: smallest weights first; ties go to the recipe that needs no calibration, then by name (so int4-rtn
before int4-awq, int8-wo before int8-sq); the fp16 baseline is always last.

Search: each remaining recipe is quantized (fp32 export; the fp16 baseline from an fp16 export) into a
staging folder under `attempts/` and validated on the prompt suite in both reasoning modes plus perplexity
on the built-in held-out text, against the recipe's gates. The first that passes is kept: its complete
folder is renamed to ROOT/<model>/<recipe> (it appears whole or not at all); the rest are not tried.
A rejected attempt keeps only its validation report (attempts/<recipe>/validation/). A recipe that
cannot apply to this model (an INT4 group that does not divide its widths) is "not applicable".

A published quantized checkpoint (Qwen's FP8, AWQ, GPTQ) is not re-quantized: its one candidate is the
checkpoint as stored ("awq-int4-g128 (as stored)"), sized at its stored bytes, skipped when the target
lacks its precision, cannot take it (asymmetric MoE experts) or has no room, else exported with its own
weights (fp16 when its scales are exact in fp16, else fp32) and validated against its own dequantization.

Then, for the kept artifact: ONNX Runtime lowering, a TensorRT engine when the target's flavour is
installed (else skipped with the reason), and a bundle for Jetson targets (the bundle ships the graph
lowered for TensorRT; the device builds its engine, so no local engine is needed).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qwen3_compile.environment import environment
from qwen3_compile.errors import BadInputError, Qwen3CompileError
from qwen3_compile.export.stage import ExportedArtifact, ExportOptions, export_onnx
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.loading import LoadedModel, ModelSource, load_model, resolve_model
from qwen3_compile.models.quantized.config import QuantFormat
from qwen3_compile.pipeline import build_engine_if_installed
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.quantize.compat import sm_tuple
from qwen3_compile.quantize.recipe import QuantRecipe, builtin_recipes, load_recipe, with_group_size
from qwen3_compile.quantize.stage import quantize_artifact
from qwen3_compile.sizing import GB, MemoryPlan, imported_weight_bytes, plan_memory
from qwen3_compile.storage.artifact_dir import replace_dir
from qwen3_compile.targets import Target, all_targets, get_target
from qwen3_compile.validate.perplexity import PerplexityRequest
from qwen3_compile.validate.stage import ValidationReport, validate_artifact

DEFAULT_CONTEXT = 4096  # the deployment context of the memory plan (the model's maximum when smaller)
BASELINE = "fp16"
AS_STORED = "as-stored"  # a published quantized checkpoint's one candidate (and its kept folder's name)

Decision = Literal["kept", "rejected", "skipped", "not applicable", "not tried"]


@dataclass(frozen=True)
class GateResults:
    """An attempt's validation numbers beside the recipe's gates."""

    mean_kl: float  # prefill and teacher-forced decode positions together, as validate's gate counts it
    max_mean_kl: float
    top1: float  # the lower of prefill and decode top-1 agreement
    min_top1: float
    ppl_increase: float | None
    max_ppl_increase: float | None
    failures: tuple[str, ...]
    report: str

    @classmethod
    def from_report(cls, report: ValidationReport, report_dir: Path) -> GateResults:
        prefill, decode = report.summary("prefill"), report.summary("decode")
        positions = max(prefill.positions + decode.positions, 1)
        mean_kl = (prefill.mean_kl * prefill.positions + decode.mean_kl * decode.positions) / positions
        ppl = report.perplexity
        return cls(
            mean_kl=float(mean_kl),
            max_mean_kl=report.gates.max_mean_kl,
            top1=float(min(prefill.top1, decode.top1 if decode.positions else 1.0)),
            min_top1=report.gates.min_top1,
            ppl_increase=None if ppl is None else float(ppl.ppl_increase),
            max_ppl_increase=report.gates.max_ppl_increase,
            failures=tuple(report.failures),
            report=str(report_dir / "report.md"),
        )

    def to_dict(self) -> dict:
        return {
            "mean_kl": self.mean_kl,
            "max_mean_kl": self.max_mean_kl,
            "top1": self.top1,
            "min_top1": self.min_top1,
            "ppl_increase": self.ppl_increase,
            "max_ppl_increase": self.max_ppl_increase,
            "failures": list(self.failures),
            "report": self.report,
        }


@dataclass(frozen=True)
class RecipeAttempt:
    recipe: str  # as asked (built-in name)
    applied: str  # the recipe applied (with --group-size: e.g. int4-rtn-g32)
    precisions: tuple[str, ...]
    plan: MemoryPlan  # at the deployment context: weights + KV cache + activations
    usable_gb: float
    decision: Decision
    reason: str = ""
    gates: GateResults | None = None
    artifact: str | None = None  # the kept folder
    seconds: float | None = None  # quantize + validate

    @property
    def weight_bytes(self) -> int:
        """Deployed weights in the recipe's format (sizing.weight_bytes)."""
        return self.plan.weights

    @property
    def needed_gb(self) -> float:
        return self.plan.total / GB

    @property
    def fits(self) -> bool:
        return self.needed_gb <= self.usable_gb

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "applied": self.applied,
            "precisions": list(self.precisions),
            "weight_bytes": self.weight_bytes,
            "memory": {
                "needed_gb": self.needed_gb,
                "usable_gb": self.usable_gb,
                "fits": self.fits,
                "weights_gb": self.plan.weights / GB,
                "kv_cache_gb": self.plan.kv_cache / GB,
                "activations_gb": self.plan.activations / GB,
                "context": self.plan.context,
                "kv_dtype": self.plan.kv_dtype,
            },
            "decision": self.decision,
            "reason": self.reason,
            "gates": self.gates.to_dict() if self.gates else None,
            "artifact": self.artifact,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class TargetCompileResult:
    model: str
    target: Target
    directory: Path
    context: int
    attempts: list[RecipeAttempt]
    # after the search, for the kept artifact only: {"path", ...} or {"skipped": why}
    lowered: dict | None = None
    engine: dict | None = None
    bundle: dict | None = None
    exports: dict[str, str] = field(default_factory=dict)

    @property
    def kept(self) -> RecipeAttempt | None:
        return next((a for a in self.attempts if a.decision == "kept"), None)

    @property
    def passed(self) -> bool:
        return self.kept is not None

    def to_dict(self) -> dict:
        kept = self.kept
        return {
            "model": self.model,
            "target": self.target.name,
            "usable_gb": self.target.usable_gb,
            "context": self.context,
            "directory": str(self.directory),
            "passed": self.passed,
            "kept": None if kept is None else {"recipe": kept.applied, "artifact": kept.artifact},
            "attempts": [a.to_dict() for a in self.attempts],
            "exports": self.exports,
            "lowered": self.lowered,
            "engine": self.engine,
            "bundle": self.bundle,
            "environment": environment(),
        }


@dataclass(frozen=True)
class _Candidate:
    name: str
    recipe: QuantRecipe
    plan: MemoryPlan
    usable_gb: float
    refused: str | None  # why the target cannot run it

    @property
    def needed_gb(self) -> float:
        return self.plan.total / GB

    @property
    def order(self) -> tuple:
        return (self.name == BASELINE, self.plan.weights, self.recipe.needs_calibration, self.name)

    def attempt(self, decision: Decision, reason: str = "", **more) -> RecipeAttempt:
        return RecipeAttempt(
            self.name,
            self.recipe.name,
            self.recipe.precisions,
            self.plan,
            self.usable_gb,
            decision,
            reason,
            **more,
        )


def recipe_names(requested: list[str] | None) -> list[str]:
    """The built-in recipes to consider: all, or `requested` (each must be one; repeats dropped)."""
    builtin = sorted(builtin_recipes())
    if requested is None:
        return builtin
    if not requested:
        raise BadInputError(
            "no recipe named.",
            field="--recipes",
            fix=f"name some of: {', '.join(builtin)} (comma-separated).",
        )
    unknown = [name for name in requested if name not in builtin]
    if unknown:
        raise BadInputError(
            f"unknown recipe{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}.",
            field="--recipes",
            fix=f"use a comma-separated list of: {', '.join(builtin)}.",
        )
    return list(dict.fromkeys(requested))


def plan_candidates(
    arch: Qwen3Arch, target: Target, names: list[str], group_size: int | None, context: int
) -> list[_Candidate]:
    """Every recipe with its size and memory plan, in trial order (see the module doc)."""
    candidates = []
    for name in names:
        recipe = load_recipe(name)
        if group_size is not None and recipe.weights.granularity == "per_group":
            recipe = with_group_size(recipe, group_size)
        refused = _refusal(recipe, target, arch)
        kv = recipe.kv_cache.dtype if recipe.kv_cache else "fp16"
        plan = plan_memory(arch, recipe.weights.dtype, context, kv_dtype=kv)
        candidates.append(_Candidate(name, recipe, plan, target.usable_gb, refused))
    return sorted(candidates, key=lambda c: c.order)


def _refusal(recipe: QuantRecipe, target: Target, arch: Qwen3Arch) -> str | None:
    """Why `target` cannot run `recipe` on this model (quantize/compat.py's rule; the build stage's INT4
    experts refusal, engine/inputs.py: every target deploys through TensorRT), or None."""
    from qwen3_compile.engine.inputs import EXPERT_TENSORS, int4_experts_refusal

    missing = [p for p in recipe.precisions if p not in target.precisions]
    if missing:
        return f"{target.name} has no {', '.join(missing)} (its precisions: {', '.join(target.precisions)})"
    if sm_tuple(target.sm) < sm_tuple(recipe.min_sm):
        return f"needs SM >= {recipe.min_sm}; {target.name} is SM {target.sm}"
    experts = any(recipe.select.selects(name) for name in EXPERT_TENSORS)
    if arch.num_experts and recipe.weights.dtype == "int4" and experts:
        # quantizing recipes start from an fp32 export here (INT4 experts need an fp16 one for the plugin)
        why = int4_experts_refusal(arch, "fp32", recipe.weights.group_size, target)
        if why:
            return f"INT4 MoE experts: {target.tensorrt} engines cannot take them: {why} (engine/inputs.py)"
    return None


def compile_for_target(
    model: str,
    target: str | Target,
    output_root: str | Path = "artifacts",
    *,
    recipes: list[str] | None = None,
    group_size: int | None = None,
    num_layers: int | None = None,
    decode_steps: int = 16,
    long_context_tokens: int = 0,
    ppl_windows: int | None = None,
    smoke_tokens: int = 16,
    progress: Progress = NO_PROGRESS,
) -> TargetCompileResult:
    """Search the recipes for `target` into `output_root`/<model name>/ and write compile.json there."""
    target = get_target(target) if isinstance(target, str) else target
    names = recipe_names(recipes)
    source = resolve_model(model, num_layers)  # the architecture only: nothing is loaded before the plan
    name = Path(model).name if Path(model).exists() else model
    run_dir = Path(output_root) / (name if num_layers is None else f"{name}-{num_layers}l")
    context = min(source.arch.max_position_embeddings, DEFAULT_CONTEXT)
    imported = source.quantization
    if imported is not None and (recipes is not None or group_size is not None):
        raise BadInputError(
            f"'{model}' is a published quantized checkpoint ({imported.format.label}): it is compiled as "
            "stored, never re-quantized.",
            field="--recipes" if recipes is not None else "--group-size",
            fix="drop --recipes and --group-size, or start from the model's BF16 release to choose a recipe.",
        )
    candidates = [] if imported else plan_candidates(source.arch, target, names, group_size, context)
    _remove_earlier_run(run_dir)
    search = _Search(source, target, run_dir, decode_steps, long_context_tokens, ppl_windows, progress)
    attempts: list[RecipeAttempt] = []
    kept: RecipeAttempt | None = None
    if imported is not None:
        attempts.append(search.attempt_as_stored(context))
        kept = attempts[-1] if attempts[-1].decision == "kept" else None
    for candidate in candidates:
        if candidate.refused:
            attempts.append(candidate.attempt("skipped", candidate.refused))
        elif candidate.needed_gb > target.usable_gb:
            attempts.append(candidate.attempt("skipped", _does_not_fit(candidate.needed_gb, target)))
        elif kept is not None:
            attempts.append(candidate.attempt("not tried", f"{kept.applied} passed first"))
        else:
            attempts.append(search.attempt(candidate))
            if attempts[-1].decision == "kept":
                kept = attempts[-1]
    result = TargetCompileResult(name, target, run_dir, context, attempts, exports=search.export_paths())
    if kept is not None:
        result = _finish(result, Path(kept.artifact), smoke_tokens, progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "compile.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result


def _remove_earlier_run(run_dir: Path) -> None:
    """An earlier search's attempts, kept artifact (and its ORT lowering) and compile.json: this run replaces
    them, and one that stops half-way leaves no stale result. Only folders directly in `run_dir`."""
    shutil.rmtree(run_dir / "attempts", ignore_errors=True)
    previous = run_dir / "compile.json"
    try:
        kept = (json.loads(previous.read_text()).get("kept") or {}).get("artifact")
    except (OSError, ValueError, AttributeError):
        kept = None
    if isinstance(kept, str) and Path(kept).parent.resolve() == run_dir.resolve():
        for folder in (Path(kept), Path(f"{kept}-ort")):
            shutil.rmtree(folder, ignore_errors=True)
    previous.unlink(missing_ok=True)


def stored_name(fmt: QuantFormat) -> str:
    """A published checkpoint's format in a recipe-like name: awq-int4-g128, gptq-int8-g128-desc-act,
    fp8-block128x128."""
    if fmt.method == "fp8":
        return f"fp8-block{fmt.block_rows}x{fmt.group_size}"
    return f"{fmt.method}-int{fmt.bits}-g{fmt.group_size}" + ("-desc-act" if fmt.desc_act else "")


def _does_not_fit(needed_gb: float, target: Target) -> str:
    return f"does not fit: needs {needed_gb:.2f} GB > {target.usable_gb:g} GB usable"


class _Search:
    """Quantize and validate candidates one at a time; the reference and the exports are made on first use."""

    def __init__(
        self,
        source: ModelSource,
        target: Target,
        run_dir: Path,
        decode_steps: int,
        long_context_tokens: int,
        ppl_windows: int | None,
        progress: Progress,
    ):
        self.source, self.target, self.run_dir, self.progress = source, target, run_dir, progress
        self.decode_steps, self.long_context_tokens = decode_steps, long_context_tokens
        self.perplexity = PerplexityRequest(max_windows=ppl_windows)
        self.loaded: LoadedModel | None = None
        self.exports: dict[str, ExportedArtifact] = {}

    def export_paths(self) -> dict[str, str]:
        return {dtype: str(e.directory) for dtype, e in self.exports.items()}

    def reference(self) -> LoadedModel:
        if self.loaded is None:
            self.loaded = load_model(self.source, progress=self.progress)
        return self.loaded

    def export(self, dtype: str) -> ExportedArtifact:
        if dtype not in self.exports:
            # fp32 from the loaded reference (the same weights); fp16 straight from the checkpoint or preset
            model = self.reference() if dtype == "fp32" else self.source
            self.exports[dtype] = export_onnx(
                model,
                self.run_dir / f"export-{dtype}",
                ExportOptions(dtype=dtype),
                force=True,
                progress=self.progress,
            )
        return self.exports[dtype]

    def registered_target(self) -> str | None:
        """The target's name for the quantize manifest, when it is one of recipes/targets/*.toml."""
        return self.target.name if all_targets().get(self.target.name) == self.target else None

    def attempt(self, candidate: _Candidate) -> RecipeAttempt:
        recipe, clock = candidate.recipe, time.perf_counter()
        folder = self.run_dir / "attempts" / candidate.name
        staging = folder / "artifact"
        export = self.export("fp16" if recipe.weights.dtype == "fp16" else "fp32")
        try:
            quantize_artifact(
                export.directory,
                recipe,
                staging,
                force=True,
                target=self.registered_target(),
                progress=self.progress,
            )
        except BadInputError as err:
            shutil.rmtree(folder, ignore_errors=True)
            return candidate.attempt("not applicable", err.problem)
        return self._validate_and_keep(candidate.attempt, folder, staging, recipe.name, clock)

    def attempt_as_stored(self, context: int) -> RecipeAttempt:
        """The one candidate of a published quantized checkpoint: its own weights, at their stored size."""
        quant, arch = self.source.quantization, self.source.arch
        precision = quant.format.precision
        plan = plan_memory(arch, precision, context, weights=imported_weight_bytes(arch, quant))
        usable = self.target.usable_gb

        def attempt(decision: Decision, reason: str = "", **more) -> RecipeAttempt:
            label = f"{stored_name(quant.format)} (as stored)"
            return RecipeAttempt(AS_STORED, label, (precision,), plan, usable, decision, reason, **more)

        if precision not in self.target.precisions:
            precisions = ", ".join(self.target.precisions)
            return attempt("skipped", f"{self.target.name} has no {precision} (its precisions: {precisions})")
        if arch.is_moe and quant.format.method != "fp8" and not quant.format.sym:
            return attempt(
                "skipped", "its MoE experts have zero points, which TensorRT's expert paths cannot take"
            )
        if plan.total / GB > usable:
            return attempt("skipped", _does_not_fit(plan.total / GB, self.target))
        clock = time.perf_counter()
        folder = self.run_dir / "attempts" / AS_STORED
        staging = folder / "artifact"
        # fp16 for the device where the checkpoint's scales are fp16 numbers (AWQ, GPTQ), else fp32 (exact)
        dtype = "fp16" if quant.scales_exact_in_fp16() else "fp32"
        export_onnx(self.source, staging, ExportOptions(dtype=dtype), force=True, progress=self.progress)
        return self._validate_and_keep(attempt, folder, staging, AS_STORED, clock)

    def _validate_and_keep(
        self, attempt, folder: Path, staging: Path, name: str, clock: float
    ) -> RecipeAttempt:
        """Validate `staging`; kept: renamed to run_dir/`name`; rejected: only its report stays."""
        report = validate_artifact(
            staging,
            self.reference(),
            decode_steps=self.decode_steps,
            long_context_tokens=self.long_context_tokens,
            bisect=False,
            perplexity=self.perplexity,
            progress=self.progress,
        )
        seconds = round(time.perf_counter() - clock, 1)
        if report.passed:
            final = self.run_dir / name
            replace_dir(staging, final)  # complete (model, manifest, validation) before it has its name
            shutil.rmtree(folder, ignore_errors=True)
            gates = GateResults.from_report(report, final / "validation")
            return attempt("kept", "", gates=gates, artifact=str(final), seconds=seconds)
        (folder / "validation").parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging / "validation", folder / "validation")
        shutil.rmtree(staging)  # a rejected attempt keeps only its report
        gates = GateResults.from_report(report, folder / "validation")
        return attempt("rejected", "; ".join(report.failures), gates=gates, seconds=seconds)


def _finish(
    result: TargetCompileResult, artifact: Path, smoke_tokens: int, progress: Progress
) -> TargetCompileResult:
    from dataclasses import replace

    from qwen3_compile.lower.stage import lower_artifact

    run_dir, target = result.directory, result.target
    ort = lower_artifact(artifact, run_dir / f"{artifact.name}-ort", "ort", force=True, progress=progress)
    lowered = {"path": str(ort.model_path), "runtime": "ort"}
    try:
        engine = build_engine_if_installed(artifact, target, run_dir, progress)
    except Qwen3CompileError as err:  # a target the build refuses is a result of the search, not a crash
        engine = {"skipped": f"the build was refused: {err.message}"}
    bundle = None
    if target.name.startswith("jetson"):
        bundle = _bundle(artifact, target, run_dir / f"{result.model}-{target.name}.tar.gz", smoke_tokens)
    return replace(result, lowered=lowered, engine=engine, bundle=bundle)


def _bundle(artifact: Path, target: Target, output: Path, smoke_tokens: int) -> dict:
    if all_targets().get(target.name) != target:
        return {"skipped": f"{target.name} is not one of recipes/targets/*.toml"}
    from qwen3_compile.bundle import bundle_artifact

    try:
        made = bundle_artifact(artifact, target.name, output, smoke_tokens=smoke_tokens, force=True)
    except Qwen3CompileError as err:
        return {"skipped": f"the bundle was refused: {err.message}"}
    return {
        "path": str(made.path),
        "bytes": made.bytes,
        "sha256": made.sha256,
        "moe_lowering": made.manifest.moe.lowering,
        "engine": "built on the device from the bundled graph (build_engine.py)",
    }
