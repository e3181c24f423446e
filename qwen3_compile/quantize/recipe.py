"""Quantization recipes: versioned data (`recipes/quant/*.toml`) decoded into frozen config objects by the
shared strict decoder (schema.py); unknown names or fields, wrong types, NaN and out-of-range values are
errors naming the field."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from qwen3_compile.errors import BadInputError
from qwen3_compile.schema import decode, encode
from qwen3_compile.storage.user_files import read_text

KvCacheDtype = Literal["fp8"]
KV_CACHE_DTYPES = get_args(KvCacheDtype)
RECIPE_VERSION = 1


@dataclass(frozen=True)
class WeightSpec:
    dtype: Literal["fp16", "int8", "fp8"] = "int8"  # fp16: the baseline, nothing quantized
    granularity: Literal["per_channel"] = "per_channel"


@dataclass(frozen=True)
class ActivationSpec:
    """Static activation quantization at the input of every quantized weight (W8A8)."""

    dtype: Literal["int8", "fp8"] = "int8"
    granularity: Literal["per_tensor"] = "per_tensor"
    method: Literal["max"] = "max"  # the calibrated absolute maximum becomes the top of the range


@dataclass(frozen=True)
class SmoothQuantSpec:
    """Migrate activation outliers into the weights: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), X / s
    folded into the preceding RMSNorm weight, W * s into the projections that read it."""

    alpha: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})


@dataclass(frozen=True)
class KvCacheSpec:
    dtype: KvCacheDtype = "fp8"


# What an E4M3 KV cache may add to a recipe's gates (--kv-cache fp8). Measured on tiny-moe over int8-wo:
# mean KL 0.011 -> 0.023, top-1 0.967 -> 0.936 (tiny-dense: 0.0009 -> 0.0024); head_dim 16 and random
# weights make the cache values' relative error count more than in real checkpoints.
KV_FP8_ALLOWANCE = {"max_mean_kl": 0.02, "min_top1": 0.04}


@dataclass(frozen=True)
class CalibrationSpec:
    # calibration prompts (each rendered in both reasoning modes); the cap keeps calibration a build step
    samples: int = field(default=32, metadata={"min": 1, "max": 4096})
    # per prompt, after chat rendering; at least 2 (GEMV shapes are not representative)
    max_tokens: int = field(default=256, metadata={"min": 2, "max": 32768})


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
    max_mean_kl: float = field(metadata={"min": 0.0, "max": 100.0})
    min_top1: float = field(metadata={"min": 0.0, "max": 1.0})


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
    source: str = field(default="", compare=False, metadata={"internal": True})  # where it was read

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
        return encode(self, drop_none=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> QuantRecipe:
        recipe = replace(decode(cls, data, file=source), source=source)
        if recipe.version != RECIPE_VERSION:
            raise BadInputError(
                f"recipe version {recipe.version} is not supported.",
                file=source,
                field="version",
                fix=f"this qwen3-compile reads version {RECIPE_VERSION}.",
            )
        if recipe.activations and recipe.weights.dtype == "fp16":
            raise BadInputError(
                "activation quantization needs quantized weights.",
                file=source,
                field="weights.dtype",
                fix="set weights.dtype to int8 or fp8, or drop [activations].",
            )
        if recipe.smoothquant and not recipe.activations:
            raise BadInputError(
                "SmoothQuant balances activation and weight ranges: it needs an [activations] section.",
                file=source,
                field="smoothquant",
                fix="add [activations] (W8A8) or drop [smoothquant].",
            )
        for key in ("include", "skip"):
            for i, pattern in enumerate(getattr(recipe.select, key)):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise BadInputError(
                        f"{pattern!r} is not a regular expression ({err}).",
                        file=source,
                        field=f"select.{key}[{i}]",
                        fix="write a Python regular expression matched against checkpoint tensor names.",
                    ) from None
        return recipe


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("qwen3_compile").joinpath("recipes", "quant")
    return {p.name.removesuffix(".toml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


MAX_RECIPE_BYTES = 1 << 20


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
        data = tomllib.loads(
            read_text(
                path, MAX_RECIPE_BYTES, "pass an existing recipe file.", "a recipe is a few kB of TOML."
            )
        )
    except tomllib.TOMLDecodeError as err:
        raise BadInputError(
            f"the recipe is not valid TOML ({err}).", file=path, fix="fix the TOML syntax."
        ) from None
    return QuantRecipe.from_dict(data, str(path))


def with_kv_cache(recipe: QuantRecipe, dtype: str) -> QuantRecipe:
    """`recipe` plus a quantized KV cache (the CLI's --kv-cache); the name says so and the gates widen by
    the cache's own measured allowance."""
    if dtype not in KV_CACHE_DTYPES:
        raise BadInputError(
            f"KV cache dtype {dtype!r} is not supported.", field="--kv-cache", fix=f"use {KV_CACHE_DTYPES}."
        )
    gates = RecipeGates(
        max_mean_kl=round(recipe.gates.max_mean_kl + KV_FP8_ALLOWANCE["max_mean_kl"], 6),
        min_top1=round(recipe.gates.min_top1 - KV_FP8_ALLOWANCE["min_top1"], 6),
    )
    return replace(recipe, name=f"{recipe.name}+kv-{dtype}", kv_cache=KvCacheSpec(dtype), gates=gates)
