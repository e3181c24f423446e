"""The `validate` stage: an artifact against the PyTorch reference on the prompt suite, both reasoning
modes, with gates, layer bisection and a report (report.json, report.md, PNG plots)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen3_compile.backends.base import generate, left_padded_batch
from qwen3_compile.backends.onnxruntime.op_libraries import describe_libraries
from qwen3_compile.backends.onnxruntime.settings import ort_optimization, ort_session_config
from qwen3_compile.backends.registry import ORT_DEVICES, open_runner
from qwen3_compile.backends.torch_reference import TorchRunner, model_device, require_reference_device
from qwen3_compile.environment import environment
from qwen3_compile.errors import BadInputError
from qwen3_compile.models.loading import LoadedModel, load_model, resolve_model
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.quantize.recipe import QuantRecipe
from qwen3_compile.storage.artifact_dir import atomic_output_dir, check_not_an_input, refuse_existing
from qwen3_compile.storage.manifest import read_manifest, verify_outputs
from qwen3_compile.tokenizer import ENDOFTEXT_ID, load_tokenizer
from qwen3_compile.validate.bisect import Bisection, bisect_layers, reference_layer_outputs, relative_errors
from qwen3_compile.validate.gates import Gates, gates_for
from qwen3_compile.validate.metrics import PositionMetrics, Summary, compare_logits, summarise
from qwen3_compile.validate.perplexity import PerplexityRequest, PerplexityResult, measure_perplexity
from qwen3_compile.validate.prompt_suite import (
    PromptCase,
    load_prompt_entries,
    long_context_case,
    render_suite,
)
from qwen3_compile.validate.recipe_reference import RecipeReference, RecipeRunner, recipe_reference

LONG_CONTEXT_CAP = 8192
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class CaseResult:
    case: PromptCase
    prefill: PositionMetrics
    decode: PositionMetrics  # teacher-forced: both sides fed the reference's greedy tokens
    greedy_match: int  # leading free-running greedy tokens equal to the reference's
    decode_steps: int
    # against the recipe's own fake-quantized model (quantized artifacts): prefill then forced decode
    recipe: PositionMetrics | None = None
    # fp16 graphs: that model run in fp16 against itself in fp32, the same tokens (the rounding floor)
    recipe_noise: PositionMetrics | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.case.name,
            "category": self.case.category,
            "mode": self.case.mode,
            "prompt_tokens": len(self.case.ids),
            # long prompts are compared on their last prefill chunk: the first compared position
            "first_position": len(self.case.ids) - len(self.prefill.kl),
            "prefill": summarise([self.prefill]).to_dict(),
            "decode": summarise([self.decode]).to_dict(),
            "greedy_match": self.greedy_match,
            "decode_steps": self.decode_steps,
            "kl_per_position": self.prefill.kl + self.decode.kl,
            "top1_per_position": self.prefill.top1 + self.decode.top1,
        }


@dataclass(frozen=True)
class RecipeCheck:
    """The artifact against its recipe's own fake-quantized model (validate/recipe_reference.py): they
    should agree to float rounding. Gated on the median over positions of the largest |logit error|, so a
    rare rounding-boundary flip (one activation one step apart after a different summation order) cannot
    fail it while a wrong weight, scale or routing, which moves every position, does.

    An fp16 graph rounds its activations before quantizing them, which moves INT8 rounding steps
    everywhere, so its floor is not fp32's: the same recipe model run in fp16 measures it in the same run
    (`noise_median_max_abs`), and the tolerance is that floor times RECIPE_CHECK_NOISE_FACTOR."""

    tolerance: float
    positions: int
    median_max_abs: float
    fraction_above: float  # positions whose largest |logit error| exceeds the tolerance
    mean_kl: float
    top1: float
    bisection: Bisection | None
    noise_median_max_abs: float | None = None  # fp16 graphs: the recipe model in fp16 against fp32

    @property
    def passed(self) -> bool:
        return self.median_max_abs <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"passed": self.passed}


def _recipe_check(results: list[CaseResult]) -> RecipeCheck:
    errors = np.array([v for c in results for v in c.recipe.max_abs])
    kl = [v for c in results for v in c.recipe.kl]
    top1 = [v for c in results for v in c.recipe.top1]
    noise = None
    tolerance = RECIPE_CHECK_TOLERANCE
    if results[0].recipe_noise is not None:
        noise = float(np.median([v for c in results for v in c.recipe_noise.max_abs]))
        tolerance = max(tolerance, RECIPE_CHECK_NOISE_FACTOR * noise)
    return RecipeCheck(
        tolerance=tolerance,
        positions=len(errors),
        median_max_abs=float(np.median(errors)),
        fraction_above=float((errors > tolerance).mean()),
        mean_kl=float(np.mean(kl)),
        top1=float(np.mean(top1)),
        bisection=None,
        noise_median_max_abs=noise,
    )


@dataclass(frozen=True)
class ValidationReport:
    artifact: str
    reference: str
    backend: str
    gates: Gates
    gates_source: str
    cases: list[CaseResult]
    bisection: Bisection | None
    failures: list[str] = field(default_factory=list)
    directory: Path | None = None
    model_sha256: str | None = None  # of the validated graph (from the artifact's manifest), so a report
    # copied next to another model is recognised as someone else's
    backend_settings: dict[str, Any] = field(default_factory=dict)  # how the backend ran it (ORT's session)
    perplexity: PerplexityResult | None = None
    recipe_check: RecipeCheck | None = None
    reference_device: str = "cpu"  # where the PyTorch reference ran (fp32; on CUDA with TF32 off)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def modes(self) -> list[str]:
        return sorted({c.case.mode for c in self.cases})

    def summary(self, part: str) -> Summary:
        return summarise([getattr(c, part) for c in self.cases])

    @property
    def greedy_match_fraction(self) -> float:
        """Free-running greedy steps that match the reference, over all decode steps."""
        return sum(c.greedy_match for c in self.cases) / max(sum(c.decode_steps for c in self.cases), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "model_sha256": self.model_sha256,
            "reference": self.reference,
            "reference_device": self.reference_device,
            "backend": self.backend,
            "backend_settings": self.backend_settings,
            "passed": self.passed,
            "failures": self.failures,
            "gates": self.gates.to_dict(),
            "gates_source": self.gates_source,
            "modes": self.modes,
            "summary": {
                "prefill": self.summary("prefill").to_dict(),
                "decode": self.summary("decode").to_dict(),
                "greedy_match_fraction": self.greedy_match_fraction,
            },
            "bisection": self.bisection.to_dict() if self.bisection else None,
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "recipe_check": self.recipe_check.to_dict() if self.recipe_check else None,
            "cases": [c.to_dict() for c in self.cases],
            "environment": environment(),
        }


def _check_reference(manifest, reference_arch, artifact: Path, reference: str) -> None:
    """The artifact's architecture (from its manifest) must be the reference's."""
    recorded = manifest.architecture
    expected = reference_arch.to_hf_dict()
    for key in sorted(set(recorded) | set(expected)):
        if key == "max_position_embeddings":
            continue
        if recorded.get(key) != expected.get(key):
            raise BadInputError(
                f"the reference does not match the artifact: {key} is {expected.get(key)!r} in {reference} "
                f"but {recorded.get(key)!r} in the artifact.",
                file=artifact / "manifest.json",
                field=f"architecture.{key}",
                fix="pass the checkpoint or preset (and --layers) the artifact was exported from.",
            )


def _all_logits(g) -> np.ndarray:
    """[positions, V]: the prefill's positions then each decode step's, of the first sequence."""
    return np.concatenate([g.prefill_logits[0], *(s[0][None] for s in g.step_logits)])


def _run_case(
    reference: TorchRunner, candidate, case: PromptCase, steps: int, recipe_runner=None, noise_runner=None
) -> CaseResult:
    batch = left_padded_batch([case.ids], ENDOFTEXT_ID)
    # long prompts are prefilled in chunks; their comparison covers the last chunk (the large positions)
    chunk = PREFILL_CHUNK if len(case.ids) > PREFILL_CHUNK else None
    runs, key = reference.loaded.generations, (tuple(case.ids), steps, chunk)
    if key not in runs:  # the reference's greedy run does not depend on the artifact
        runs[key] = generate(reference, batch, steps, prefill_chunk=chunk)
    ref = runs[key]
    forced = generate(candidate, batch, steps, forced=ref.tokens, prefill_chunk=chunk)
    recipe = noise = None
    if recipe_runner is not None:  # fed the same tokens as the artifact
        own = generate(recipe_runner, batch, steps, forced=ref.tokens, prefill_chunk=chunk)
        recipe = compare_logits(_all_logits(own), _all_logits(forced))
        if noise_runner is not None:
            low = generate(noise_runner, batch, steps, forced=ref.tokens, prefill_chunk=chunk)
            noise = compare_logits(_all_logits(own), _all_logits(low))
    free = generate(candidate, batch, steps, prefill_chunk=chunk)
    prefill = compare_logits(ref.prefill_logits[0], forced.prefill_logits[0])
    decode = PositionMetrics([], [], [], [], [])
    if ref.step_logits:
        decode = compare_logits(
            np.stack([s[0] for s in ref.step_logits]), np.stack([s[0] for s in forced.step_logits])
        )
    mismatch = [i for i, (a, b) in enumerate(zip(ref.tokens[0], free.tokens[0], strict=True)) if a != b]
    return CaseResult(
        case,
        prefill,
        decode,
        mismatch[0] if mismatch else len(ref.tokens[0]),
        len(ref.tokens[0]),
        recipe,
        noise,
    )


def _evaluate(report: ValidationReport) -> list[str]:
    g, prefill, decode = report.gates, report.summary("prefill"), report.summary("decode")
    steps = sum(c.decode_steps for c in report.cases)
    greedy = sum(c.greedy_match for c in report.cases) / max(steps, 1)
    failures = []
    mean_kl = (prefill.mean_kl * prefill.positions + decode.mean_kl * decode.positions) / max(
        prefill.positions + decode.positions, 1
    )
    if mean_kl > g.max_mean_kl:
        failures.append(f"mean KL {mean_kl:.3g} > {g.max_mean_kl:g}")
    top1 = min(prefill.top1, decode.top1 if decode.positions else 1.0)
    if g.max_abs is not None:
        # The max-abs gate lets each logit move by max_abs, so it allows swapping two tokens the reference
        # ranks less than 2 x max_abs apart (fp32: summation order alone swaps such near-ties): the top-1
        # gate counts only swaps across a wider margin
        swaps = [
            [m > 2 * g.max_abs for c in report.cases for m in getattr(c, part).top1_margin]
            for part in ("prefill", "decode")
        ]
        top1 = min(1.0 - float(np.mean(s)) if s else 1.0 for s in swaps)
        if top1 < g.min_top1:
            failures.append(
                f"top-1 agreement {top1:.4f} < {g.min_top1:g} (counting swaps of tokens the reference ranks "
                f"more than 2 x max_abs = {2 * g.max_abs:g} apart)"
            )
    elif top1 < g.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {g.min_top1:g}")
    if g.max_abs is not None and max(prefill.max_abs, decode.max_abs) > g.max_abs:
        failures.append(f"max |logit error| {max(prefill.max_abs, decode.max_abs):.3g} > {g.max_abs:g}")
    if greedy < g.min_greedy_match:
        failures.append(
            f"free-running greedy matches {greedy:.1%} of decode steps < {g.min_greedy_match:.0%}"
        )
    check = report.recipe_check
    if check is not None and not check.passed:
        failures.append(
            f"the artifact is not its recipe's quantized model: median |logit error| against the recipe's "
            f"fake-quantized PyTorch model {check.median_max_abs:.3g} > {check.tolerance:g} (it should agree "
            "to float rounding)"
        )
        layer = check.bisection.first_diverging_layer if check.bisection else None
        if layer is not None:
            failures.append(f"first divergence from the recipe's model: layer {layer}")
    ppl = report.perplexity
    if ppl is not None and g.max_ppl_increase is not None and ppl.ppl_increase > g.max_ppl_increase:
        failures.append(
            f"perplexity increase {ppl.ppl_increase:.2%} > {g.max_ppl_increase:.2%} "
            f"({ppl.reference_ppl:.4g} -> {ppl.artifact_ppl:.4g} on {ppl.text})"
        )
    if failures and report.bisection is not None:
        layer, tolerance = report.bisection.first_diverging_layer, report.bisection.tolerance
        failures.append(
            f"first divergence: layer {layer}"
            if layer is not None
            else f"no single layer exceeds the layer tolerance {tolerance:g}: the error accumulates"
        )
    return failures


# how far a correct fp32 artifact's logits may sit from its recipe's fake-quantized model (median over
# positions of the largest |error|). Measured (benchmarks/recipe_check.py): every recipe 0-1.5e-5 on
# tiny-moe and trained-dense, while one down projection scaled by 1.05 gives 0.34-0.70.
RECIPE_CHECK_TOLERANCE = 1e-3
# fp16 graphs: the tolerance is this many times the recipe model's own fp16-vs-fp32 median (measured in the
# same run). Measured (benchmarks/recipe_check.py --dtype fp16 [--factor 1.3], every recipe on both trained
# models, and on tiny-moe at 1.3): correct artifacts sit at 0.3-1.2x that floor; one down projection scaled
# by 1.3 at 2.4-74x; by 1.05 at 9-19x for weight-only recipes but 1.1-1.9x for W8A8, FP8 and the FP8 KV cache,
# whose fp16 activations round before they are quantized and move their steps everywhere: there, a 5% error
# hides in fp16's own rounding.
RECIPE_CHECK_NOISE_FACTOR = 2.0


def _recipe_reference(
    loaded: LoadedModel, artifact: Path, manifest, dtype: torch.dtype = torch.float32
) -> RecipeReference | None:
    recipe = getattr(manifest, "recipe", None)
    if not recipe:
        return None
    recipe = QuantRecipe.from_dict(recipe, str(artifact / "manifest.json"))
    return recipe_reference(loaded, artifact, recipe, dtype)


def validate_artifact(
    artifact: str | Path,
    reference: str | Path | LoadedModel,
    *,
    num_layers: int | None = None,
    backend: str = "ort",
    prompts: str | Path | None = None,
    decode_steps: int = 16,
    long_context_tokens: int | None = None,
    output: str | Path | None = None,
    bisect: bool = True,
    perplexity: PerplexityRequest | None = None,
    recipe_check: bool = True,
    force: bool = False,
    reference_device: str = "cpu",
    progress: Progress = NO_PROGRESS,
) -> ValidationReport:
    """Validate `artifact` (a folder with manifest.json) against `reference` (preset, checkpoint, or an
    already loaded reference model), and with `perplexity` also on a text. The report goes to `output`, by
    default the artifact's own report slot ARTIFACT/validation, which each validation replaces; any other
    existing folder needs `force`. `reference_device`: where a reference loaded here runs ("cuda": the
    float model on the GPU in fp32, TF32 off; a quantized artifact's recipe model stays on the CPU)."""
    from qwen3_compile.validate.report import write_report

    artifact = Path(artifact)
    slot = (artifact / "validation").resolve()  # the artifact's own report: each validation replaces it
    out = slot if output is None else Path(output).resolve()
    if out == slot:
        force = True
    else:  # never over, inside or around the artifact or the reference checkpoint
        given = [Path(reference)] if isinstance(reference, (str, Path)) and Path(reference).is_dir() else []
        check_not_an_input(out, [artifact, *given])
    refuse_existing(out, force)
    require_reference_device(reference_device)
    manifest = read_manifest(artifact)
    if getattr(manifest.options, "logits", "all") == "last":
        raise BadInputError(
            "this is a deployment graph with the last position's logits only (--logits last); validation "
            "compares the logits of every position.",
            file=artifact / "manifest.json",
            field="options.logits",
            fix="validate the graph lowered with --logits all (the default); deploy the --logits last one.",
        )
    graph_file = "model.onnx" if "model.onnx" in manifest.outputs else "model.plan"
    verify_outputs(artifact, manifest, (graph_file,))
    candidate = open_runner(artifact, manifest, backend)
    loaded = reference if isinstance(reference, LoadedModel) else None
    source = loaded.source if loaded else resolve_model(reference, num_layers)
    reference = source.spec
    _check_reference(manifest, source.arch, artifact, reference)
    gates, gates_source = gates_for(manifest, random_weights=source.kind == "preset")
    tokenizer = load_tokenizer(artifact)
    cases = render_suite(tokenizer, load_prompt_entries(prompts))
    max_positions = manifest.options.max_positions
    long_tokens = (
        min(max_positions - decode_steps - 1, LONG_CONTEXT_CAP)
        if long_context_tokens is None
        else long_context_tokens
    )
    if long_tokens > 0:
        cases.append(long_context_case(tokenizer, long_tokens))
    loaded = loaded or load_model(source, progress=progress, device=reference_device)
    runner = TorchRunner(loaded)
    own = _recipe_reference(loaded, artifact, manifest) if recipe_check else None
    own_runner = RecipeRunner(own) if own is not None else None
    noise_runner = None
    if own is not None and manifest.options.dtype == "fp16":
        noise_runner = RecipeRunner(_recipe_reference(loaded, artifact, manifest, torch.float16))
    results = []
    with progress.stage("validate prompts", total=len(cases), unit="prompts") as advance:
        for case in cases:
            results.append(_run_case(runner, candidate, case, decode_steps, own_runner, noise_runner))
            advance(1)
    bisection = None
    ort_device = ORT_DEVICES.get(backend)
    probes = [c.ids for c in cases if c.category != "long-context"][:2]
    if bisect and ort_device is not None:
        with progress.stage("bisect layers", total=None):
            bisection = bisect_layers(
                loaded, artifact / "model.onnx", probes, gates.layer_tolerance, manifest, ort_device
            )
    check = None
    if own is not None:
        check = _recipe_check(results)
        if ort_device is not None and (bisect or not check.passed):  # name the layer that departs
            with progress.stage("bisect layers (recipe model)", total=None):
                own_layers = reference_layer_outputs(own.loaded, probes, own.make_cache)
                tolerance = check.tolerance
                if noise_runner is not None:  # fp16: a multiple of each layer's own fp16 rounding floor
                    low = noise_runner.reference
                    floor = relative_errors(
                        own_layers, reference_layer_outputs(low.loaded, probes, low.make_cache)
                    )
                    tolerance = [max(RECIPE_CHECK_TOLERANCE, RECIPE_CHECK_NOISE_FACTOR * f) for f in floor]
                own_bisection = bisect_layers(
                    own.loaded,
                    artifact / "model.onnx",
                    probes,
                    tolerance,
                    manifest,
                    ort_device,
                    own.make_cache,
                    reference=own_layers,
                )
            check = dataclasses.replace(check, bisection=own_bisection)
    ppl = None
    if perplexity is not None:
        ppl = measure_perplexity(runner, candidate, tokenizer, perplexity, progress=progress)
    report = ValidationReport(
        str(artifact),
        str(reference),
        backend,
        gates,
        gates_source,
        results,
        bisection,
        perplexity=ppl,
        recipe_check=check,
        reference_device=model_device(loaded.model).type,
    )
    model_hash = manifest.outputs[graph_file].sha256  # checked against the file before the run
    settings = (
        {
            "optimization": ort_optimization(manifest),
            "session_config": ort_session_config(manifest),
            "device": ort_device,
            "providers": getattr(candidate, "provider_options", {}),
        }
        if ort_device is not None
        else {}
    )
    if getattr(candidate, "custom_ops", ()):  # the ORT custom-op libraries the session ran with (--ort-ops)
        settings["custom_ops"] = describe_libraries(candidate.custom_ops)
    report = dataclasses.replace(report, model_sha256=model_hash, backend_settings=settings)
    report = dataclasses.replace(report, failures=_evaluate(report))
    with atomic_output_dir(out, force=force) as tmp:
        write_report(report, tmp)
    return dataclasses.replace(report, directory=out)
