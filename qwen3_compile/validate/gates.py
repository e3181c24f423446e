"""Validation gates: the thresholds an artifact must meet. A quantization recipe states its own (the
manifest carries them); unquantized exports get defaults by dtype."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Gates:
    max_mean_kl: float
    min_top1: float
    max_abs: float | None  # None: reported, not gated
    min_greedy_match: float  # fraction of decode steps the free-running greedy tokens must match
    layer_tolerance: float  # relative error above which a layer counts as diverged (bisection)
    max_ppl_increase: float | None = None  # relative; gated when validate measures perplexity (--ppl)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Gates:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


DEFAULT_GATES = {
    # fp32 exports compute what PyTorch computes up to summation order
    "fp32": Gates(max_mean_kl=1e-6, min_top1=1.0, max_abs=1e-3, min_greedy_match=1.0, layer_tolerance=1e-3),
    # layer tolerances: an fp16 export's layers sit 1e-4-4e-4 (relative) from fp32 on the trained models,
    # and one down projection scaled by 1.05 jumps its layer to 0.03
    "fp16": Gates(max_mean_kl=1e-3, min_top1=0.99, max_abs=None, min_greedy_match=0.0, layer_tolerance=1e-2),
    "bf16": Gates(max_mean_kl=5e-3, min_top1=0.98, max_abs=None, min_greedy_match=0.0, layer_tolerance=5e-2),
}
# a quantized artifact's layers carry its recipe's rounding (its sharp bisection is against the recipe's
# own model: validate/recipe_reference.py)
QUANTIZED_LAYER_TOLERANCE = 5e-2


def gates_for(manifest, random_weights: bool = False) -> tuple[Gates, str]:
    """(gates, where they came from): the recipe's when the artifact was quantized, else by dtype. Against
    a random-weight preset (`random_weights`) a recipe's stress gates apply where it states them."""
    recipe = getattr(manifest, "recipe", None) or {}
    if "gates" in recipe:
        defaults = DEFAULT_GATES["fp16"].to_dict() | {"layer_tolerance": QUANTIZED_LAYER_TOLERANCE}
        gates = dict(recipe["gates"])
        stress = gates.pop("random_weights", None)
        name = recipe.get("name", "?")
        if random_weights and stress:
            # perplexity on random weights means nothing: reported, not gated
            return Gates.from_dict(defaults | gates | stress | {"max_ppl_increase": None}), (
                f"recipe {name} (random-weight stress gates)"
            )
        return Gates.from_dict(defaults | gates), f"recipe {name}"
    dtype = manifest.options.dtype
    return DEFAULT_GATES.get(dtype, DEFAULT_GATES["fp16"]), f"defaults for {dtype}"
