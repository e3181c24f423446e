"""Refusals before any bundle work: a precision the target cannot run, a model that does not fit it.

Both read only the artifact's manifest (architecture, recipe, dtype), so a 30B artifact is refused without
loading its graph. The memory plan is the build stage's (`build/memory.py`: weights + KV cache at the
context + activations against the target's usable memory); the weights are the larger of the artifact's
stored bytes and the architecture's deployed size in that precision (`sizing.weight_bytes`), so the
check holds even for a folder whose weights are not there yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen3_compile.bundle.jetson import JETSON_TARGETS
from qwen3_compile.engine.inputs import BuildInput, check_target_supports
from qwen3_compile.engine.memory import EngineMemory, plan_engine_memory, stored_weight_bytes
from qwen3_compile.errors import BadInputError
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.sizing import GB, weight_bytes
from qwen3_compile.targets import Target, all_targets

# the sizing precision of an artifact: a recipe's weight dtype, else its export dtype
_EXPORT_PRECISION = {"fp16": "fp16", "bf16": "fp16"}


def sizing_precision(build_input: BuildInput) -> str:
    if build_input.recipe is not None:
        return build_input.recipe.weights.dtype
    return _EXPORT_PRECISION.get(build_input.dtype, "fp32")


def architecture_weight_bytes(arch: Qwen3Arch, precision: str) -> int:
    """Deployed weights from the architecture alone (fp32: twice fp16)."""
    return 2 * weight_bytes(arch, "fp16") if precision == "fp32" else weight_bytes(arch, precision)


@dataclass(frozen=True)
class BundlePlan:
    memory: EngineMemory
    precision: str
    context: int
    weights_stored: int
    weights_architecture: int

    def to_dict(self) -> dict:
        return self.memory.to_dict() | {
            "precision": self.precision,
            "context": self.context,
            "batch": 1,
            "weights_stored": self.weights_stored,
            "weights_architecture": self.weights_architecture,
        }


def plan_bundle_memory(build_input: BuildInput, target: Target, context: int) -> BundlePlan:
    arch, precision = build_input.arch, sizing_precision(build_input)
    stored = stored_weight_bytes(build_input.model_path)
    estimate = architecture_weight_bytes(arch, precision)
    kv = 4 if build_input.dtype == "fp32" else 2
    # the bundle ships the deployment graph: logits of the newest token only
    memory = plan_engine_memory(arch, target, max(stored, estimate), 1, context, kv, all_logits=False)
    return BundlePlan(memory, precision, context, stored, estimate)


def _need_gb(arch: Qwen3Arch, target: Target, precision: str, context: int) -> float:
    weights = architecture_weight_bytes(arch, precision)
    return plan_engine_memory(arch, target, weights, 1, context, 2, all_logits=False).total / GB


def what_fits(arch: Qwen3Arch, context: int) -> list[str]:
    """'target (usable): recipe (X GB), ...' for each Jetson target and built-in recipe that fit."""
    from qwen3_compile.quantize.compat import recipe_fits_target
    from qwen3_compile.quantize.recipe import builtin_recipes, load_recipe

    recipes = [load_recipe(name) for name in sorted(builtin_recipes())]
    options = []
    for target in (all_targets()[name] for name in JETSON_TARGETS):
        fitting = []
        for recipe in recipes:
            if not recipe_fits_target(recipe, target):
                continue
            need = _need_gb(arch, target, recipe.weights.dtype, context)
            if need <= target.usable_gb:
                fitting.append(f"{recipe.name} ({need:.1f} GB)")
        if fitting:
            options.append(f"{target.name} ({target.usable_gb:.0f} GB usable): {', '.join(fitting)}")
    return options


def check_bundle_target(build_input: BuildInput, target: Target, context: int) -> BundlePlan:
    """Raise BadInputError when the artifact's precision cannot run on `target` or its engine does not fit
    the target's memory at `context` tokens; else the memory plan."""
    check_target_supports(build_input, target)  # FP8 on Orin and friends: the build stage's own check
    plan = plan_bundle_memory(build_input, target, context)
    if plan.memory.fits:
        return plan
    arch, mem = build_input.arch, plan.memory
    here = [
        f"{precision} would need {_need_gb(arch, target, precision, context):.1f} GB"
        for precision in ("int8", "int4")
        if precision in target.precisions and precision != plan.precision
    ]
    elsewhere = what_fits(arch, context)
    raise BadInputError(
        f"the model does not fit {target.name} ({target.description}): in {plan.precision} it needs "
        f"{mem.total / GB:.1f} GB (weights {mem.weights / GB:.1f} GB + KV cache (past + present) "
        f"{mem.kv_cache / GB:.2f} GB at {context} tokens + activations {mem.activations / GB:.2f} GB) "
        f"against {mem.usable / GB:.1f} GB usable, {(mem.total - mem.usable) / GB:.1f} GB short"
        + (f" (on {target.name}: {'; '.join(here)})" if here else "")
        + ".",
        field="--target",
        fix=(
            "Jetson targets and built-in recipes that fit at this context: " + "; ".join(elsewhere) + "."
            if elsewhere
            else "no built-in recipe and target fit this model; lower --max-seq or use a smaller model."
        ),
    )
