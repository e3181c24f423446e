"""Quantization recipes: versioned data (`recipes/quant/*.toml`) decoded into frozen config objects
through an allow-list; unknown names or fields are errors that list the valid ones."""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError

WEIGHT_DTYPES = ("fp16", "int8", "fp8")  # fp16: the baseline, nothing quantized
GRANULARITIES = ("per_channel",)
ACTIVATION_DTYPES = ("int8", "fp8")
ACTIVATION_GRANULARITIES = ("per_tensor",)
CALIBRATION_METHODS = ("max",)
KV_CACHE_DTYPES = ("fp8",)
RECIPE_VERSION = 1


@dataclass(frozen=True)
class WeightSpec:
    dtype: str = "int8"
    granularity: str = "per_channel"


@dataclass(frozen=True)
class ActivationSpec:
    """Static activation quantization at the input of every quantized weight (W8A8)."""

    dtype: str = "int8"
    granularity: str = "per_tensor"
    method: str = "max"  # the calibrated absolute maximum becomes the top of the range


@dataclass(frozen=True)
class SmoothQuantSpec:
    """Migrate activation outliers into the weights: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), X / s
    folded into the preceding RMSNorm weight, W * s into the projections that read it."""

    alpha: float = 0.5


@dataclass(frozen=True)
class KvCacheSpec:
    dtype: str = "fp8"


# What an E4M3 KV cache may add to a recipe's gates (--kv-cache fp8). Measured on tiny-moe over int8-wo:
# mean KL 0.011 -> 0.023, top-1 0.967 -> 0.936 (tiny-dense: 0.0009 -> 0.0024); head_dim 16 and random
# weights make the cache values' relative error count more than in real checkpoints.
KV_FP8_ALLOWANCE = {"max_mean_kl": 0.02, "min_top1": 0.04}


@dataclass(frozen=True)
class CalibrationSpec:
    samples: int = 32  # calibration prompts (each rendered in both reasoning modes)
    max_tokens: int = 256  # per prompt, after chat rendering


@dataclass(frozen=True)
class Selection:
    """Which checkpoint tensors a recipe quantizes: matched by `include`, minus `skip` (regexes)."""

    include: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def selects(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.include) and not any(
            re.search(p, name) for p in self.skip
        )


@dataclass(frozen=True)
class RecipeGates:
    max_mean_kl: float
    min_top1: float


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    version: int
    description: str
    min_sm: str
    weights: WeightSpec
    select: Selection
    gates: RecipeGates
    activations: ActivationSpec | None = None
    smoothquant: SmoothQuantSpec | None = None
    kv_cache: KvCacheSpec | None = None
    calibration: CalibrationSpec | None = None
    source: str = field(default="", compare=False)

    @property
    def precisions(self) -> tuple[str, ...]:
        """What a deployment target must support (`precisions` in recipes/targets/*.toml): the weights',
        the activations' and the KV cache's number formats, in that order, without repeats."""
        parts = [self.weights.dtype]
        parts += [spec.dtype for spec in (self.activations, self.kv_cache) if spec is not None]
        return tuple(dict.fromkeys(parts))

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None or self.kv_cache is not None

    @property
    def calibration_spec(self) -> CalibrationSpec:
        return self.calibration or CalibrationSpec()

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        data.pop("source")
        data["select"] = {k: list(v) for k, v in data["select"].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> QuantRecipe:
        def section(key: str, kind: type, required: bool = True) -> Any:
            raw = data.get(key)
            if raw is None:
                if required:
                    raise BadInputError(
                        "a required section is missing.",
                        file=source,
                        field=key,
                        fix=f"add [{key}] with fields {_field_names(kind)}.",
                    )
                return kind()
            _check_fields(raw, kind, source, key)
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

        _check_fields(data, cls, source, "", ignore={"source"})
        for key in ("name", "version", "description", "min_sm"):
            if key not in data:
                raise BadInputError(
                    "a required field is missing.",
                    file=source,
                    field=key,
                    fix=f"a recipe has: {_field_names(cls, ignore={'source'})}.",
                )
        if data["version"] != RECIPE_VERSION:
            raise BadInputError(
                f"recipe version {data['version']} is not supported.",
                file=source,
                field="version",
                fix=f"this qwen3-compile reads version {RECIPE_VERSION}.",
            )
        weights = section("weights", WeightSpec)
        _check_choice(weights.dtype, WEIGHT_DTYPES, source, "weights", "dtype")
        _check_choice(weights.granularity, GRANULARITIES, source, "weights", "granularity")
        activations = data.get("activations") and section("activations", ActivationSpec)
        if activations:
            _check_choice(activations.dtype, ACTIVATION_DTYPES, source, "activations", "dtype")
            _check_choice(
                activations.granularity, ACTIVATION_GRANULARITIES, source, "activations", "granularity"
            )
            _check_choice(activations.method, CALIBRATION_METHODS, source, "activations", "method")
            if weights.dtype == "fp16":
                raise BadInputError(
                    "activation quantization needs quantized weights.",
                    file=source,
                    field="weights.dtype",
                    fix="set weights.dtype to int8 or fp8, or drop [activations].",
                )
        smoothquant = data.get("smoothquant") and section("smoothquant", SmoothQuantSpec)
        if smoothquant and not (0.0 <= smoothquant.alpha <= 1.0 and activations):
            raise BadInputError(
                f"smoothquant.alpha {smoothquant.alpha} needs 0 <= alpha <= 1 and an [activations] section.",
                file=source,
                field="smoothquant.alpha",
                fix="SmoothQuant balances activation and weight ranges: use alpha in [0, 1] with W8A8.",
            )
        kv_cache = data.get("kv_cache") and section("kv_cache", KvCacheSpec)
        if kv_cache:
            _check_choice(kv_cache.dtype, KV_CACHE_DTYPES, source, "kv_cache", "dtype")
        calibration = data.get("calibration") and section("calibration", CalibrationSpec)
        if calibration and (calibration.samples < 1 or calibration.max_tokens < 2):
            raise BadInputError(
                "calibration needs at least 1 sample of at least 2 tokens.",
                file=source,
                field="calibration",
                fix="set samples >= 1 and max_tokens >= 2 (GEMV shapes are not representative).",
            )
        return cls(
            name=data["name"],
            version=data["version"],
            description=data["description"],
            min_sm=data["min_sm"],
            weights=weights,
            select=section("select", Selection),
            gates=section("gates", RecipeGates),
            activations=activations or None,
            smoothquant=smoothquant or None,
            kv_cache=kv_cache or None,
            calibration=calibration or None,
            source=source,
        )


def _check_choice(value: Any, valid: tuple, source: str, where: str, key: str) -> None:
    if value not in valid:
        raise BadInputError(
            f"{where}.{key} '{value}' is not supported.",
            file=source,
            field=where,
            fix=f"{key} from {', '.join(valid)}.",
        )


def _field_names(kind: type, ignore: set[str] = frozenset()) -> str:
    return ", ".join(f.name for f in fields(kind) if f.name not in ignore)


def _check_fields(raw: dict, kind: type, source: str, where: str, ignore: set[str] = frozenset()) -> None:
    if not isinstance(raw, dict):
        raise BadInputError(
            "expected a table.",
            file=source,
            field=where or "recipe",
            fix=f"write [{where}] with fields {_field_names(kind, ignore)}.",
        )
    known = {f.name for f in fields(kind)} - ignore
    unknown = sorted(set(raw) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise BadInputError(
            f"unknown field(s) {', '.join(prefix + u for u in unknown)}.",
            file=source,
            field=prefix + unknown[0],
            fix=f"valid fields here: {', '.join(sorted(known))}.",
        )


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("qwen3_compile").joinpath("recipes", "quant")
    return {p.name.removesuffix(".toml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def load_recipe(name_or_file: str | Path) -> QuantRecipe:
    """A built-in recipe by name, or a recipe TOML file."""
    builtin = builtin_recipes()
    path = builtin.get(str(name_or_file)) or Path(name_or_file)
    if not path.exists():
        raise BadInputError(
            f"unknown recipe '{name_or_file}'.",
            field="--recipe",
            fix=f"use one of: {', '.join(sorted(builtin))}, or a recipe .toml file.",
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise BadInputError(
            f"the recipe is not valid TOML ({err}).", file=path, fix="fix the TOML syntax."
        ) from None
    return QuantRecipe.from_dict(data, str(path))


def with_kv_cache(recipe: QuantRecipe, dtype: str) -> QuantRecipe:
    """`recipe` plus a quantized KV cache (the CLI's --kv-cache); the name says so and the gates widen by
    the cache's own measured allowance."""
    _check_choice(dtype, KV_CACHE_DTYPES, recipe.source, "kv_cache", "dtype")
    gates = RecipeGates(
        max_mean_kl=round(recipe.gates.max_mean_kl + KV_FP8_ALLOWANCE["max_mean_kl"], 6),
        min_top1=round(recipe.gates.min_top1 - KV_FP8_ALLOWANCE["min_top1"], 6),
    )
    return replace(recipe, name=f"{recipe.name}+kv-{dtype}", kv_cache=KvCacheSpec(dtype), gates=gates)
