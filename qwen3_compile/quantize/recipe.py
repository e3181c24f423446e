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


# Which weight formats take which scale granularity: INT4 only per group of input channels (W4A16,
# TensorRT's weight-only form), the 8-bit formats per output channel.
GRANULARITIES = {"fp16": ("per_channel",), "int8": ("per_channel",), "fp8": ("per_channel",)}
GRANULARITIES["int4"] = ("per_group",)


@dataclass(frozen=True)
class WeightSpec:
    dtype: Literal["fp16", "int8", "fp8", "int4"] = "int8"  # fp16: the baseline, nothing quantized
    granularity: Literal["per_channel", "per_group"] = "per_channel"
    # per_group: input channels per scale; a power of two from 16 (ORT's MatMulNBits takes those) that
    # divides every quantized weight's input dimension (checked against the model when quantizing)
    group_size: int | None = field(default=None, metadata={"min": 16, "max": 4096})
    # the output projection (`lm_head`), weight-only recipes only: float (the default), int8 per output
    # channel (vocabulary row), or int4 per group of `group_size` input channels (INT4 recipes). With tied
    # embeddings a quantized copy feeds the projection and the embedding gather keeps the float table.
    lm_head: Literal["float", "int8", "int4"] = "float"


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
class AwqSpec:
    """AWQ (activation-aware weight quantization): per input channel s = mean|X|^alpha, with alpha searched
    over `grid` evenly spaced values in [0, 1] per group of projections that read one input, minimising
    the output MSE of the quantized projections on the calibration activations; W * s is quantized and
    1 / s folded into what produces X (the RMSNorm, v_proj or up_proj)."""

    grid: int = field(default=20, metadata={"min": 2, "max": 100})
    # calibration tokens kept per projection input for the search (a random subset past this)
    max_search_tokens: int = field(default=4096, metadata={"min": 16, "max": 1_000_000})
    # then AWQ's clipping search: per output channel and group, the range max|w| shrunk by the ratio in
    # 1, 1 - 0.5 / clip_grid, ... (down to 0.5) with the least output error on the same activations (0: off);
    # attention and dense MLP projections (not MoE experts, whose ratios would be E times as many)
    clip_grid: int = field(default=0, metadata={"min": 0, "max": 100})


@dataclass(frozen=True)
class KvCacheSpec:
    dtype: KvCacheDtype = "fp8"


# What an E4M3 KV cache may add to a recipe's gates (--kv-cache fp8). Measured over int8-wo on the trained
# models (dense / MoE): mean KL +0.0098 / +0.016, top-1 -0.047 / -0.089 (the MoE's decode half: 0.887),
# perplexity +0.8% / +0.4%; on tiny-moe: KL 0.011 -> 0.023, top-1 0.967 -> 0.936. head_dim 16 makes the
# cache values' relative error count more than in real checkpoints.
KV_FP8_ALLOWANCE = {"max_mean_kl": 0.02, "min_top1": 0.10, "max_ppl_increase": 0.02}


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
class RandomWeightGates:
    """Stress gates for the random-weight presets, whose narrow random layers leave quantization noise
    nowhere to average out and whose experts are near-tied everywhere (perplexity means nothing there)."""

    max_mean_kl: float = field(metadata={"min": 0.0, "max": 100.0})
    min_top1: float = field(metadata={"min": 0.0, "max": 1.0})


@dataclass(frozen=True)
class RecipeGates:
    """What an artifact of this recipe must meet against its float reference: set from trained models."""

    max_mean_kl: float = field(metadata={"min": 0.0, "max": 100.0})
    min_top1: float = field(metadata={"min": 0.0, "max": 1.0})
    # relative perplexity increase over the reference on the held-out text, when validate measures it
    max_ppl_increase: float | None = field(default=None, metadata={"min": 0.0, "max": 100.0})
    random_weights: RandomWeightGates | None = None


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
    awq: AwqSpec | None = None
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
        return self.activations is not None or self.kv_cache is not None or self.awq is not None

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
        _check_weights(recipe, source)
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


def _check_weights(recipe: QuantRecipe, source: str) -> None:
    """The weight format's granularity and group size agree; INT4 is weight-only."""
    spec = recipe.weights
    allowed = GRANULARITIES[spec.dtype]
    if spec.granularity not in allowed:
        raise BadInputError(
            f"{spec.dtype} weights are quantized {' or '.join(allowed)}, not {spec.granularity}.",
            file=source,
            field="weights.granularity",
            fix=f'set granularity = "{allowed[0]}".',
        )
    grouped = spec.granularity == "per_group"
    if grouped and spec.group_size is None:
        raise BadInputError(
            "per_group weights need a group size.",
            file=source,
            field="weights.group_size",
            fix="add group_size = 128 (input channels per scale).",
        )
    if not grouped and spec.group_size is not None:
        raise BadInputError(
            f"group_size applies to per_group weights; these are {spec.granularity}.",
            file=source,
            field="weights.group_size",
            fix="drop group_size.",
        )
    if grouped and spec.group_size & (spec.group_size - 1):
        raise BadInputError(
            f"group size {spec.group_size} is not a power of two.",
            file=source,
            field="weights.group_size",
            fix="use 16, 32, 64, 128 or 256 (ONNX Runtime's MatMulNBits takes powers of two from 16).",
        )
    if spec.dtype == "int4" and recipe.activations is not None:
        raise BadInputError(
            "INT4 recipes are weight-only (W4A16): activations stay float.",
            file=source,
            field="activations",
            fix="drop [activations], or use int8-sq / fp8 for quantized activations.",
        )
    if spec.lm_head != "float":
        _check_lm_head(recipe, source)
    if recipe.awq is not None and spec.dtype != "int4":
        raise BadInputError(
            f"AWQ scales INT4 weight groups; these weights are {spec.dtype}.",
            file=source,
            field="awq",
            fix='set weights.dtype = "int4" (per_group), or drop [awq].',
        )


def _check_lm_head(recipe: QuantRecipe, source: str) -> None:
    """A quantized lm_head belongs to weight-only INT8/INT4 recipes; INT4 needs the recipe's groups."""
    spec = recipe.weights
    if spec.dtype not in ("int8", "int4") or recipe.activations is not None:
        raise BadInputError(
            f"lm_head = {spec.lm_head!r} is for the weight-only INT8 and INT4 recipes; this one quantizes "
            f"{spec.dtype} weights{' and activations' if recipe.activations else ''}.",
            file=source,
            field="weights.lm_head",
            fix="drop lm_head (it stays float), or start from int8-wo, int4-rtn or int4-awq.",
        )
    if spec.lm_head == "int4" and spec.granularity != "per_group":
        raise BadInputError(
            "an INT4 lm_head is quantized per group of input channels; this recipe has no group size.",
            file=source,
            field="weights.lm_head",
            fix='use lm_head = "int8" here, or an INT4 recipe (int4-rtn, int4-awq).',
        )


def with_lm_head(recipe: QuantRecipe, dtype: str) -> QuantRecipe:
    """`recipe` with its output projection quantized as `dtype` (the CLI's --lm-head); the name says so and
    the decoder's checks apply. The gates stay the recipe's."""
    data = recipe.to_dict()
    data["weights"]["lm_head"] = dtype
    if dtype != "float":
        data["name"] = f"{recipe.name}+lm-head-{dtype}"
    changed = QuantRecipe.from_dict(data, "--lm-head")
    return replace(changed, source=recipe.source)


def with_group_size(recipe: QuantRecipe, group_size: int) -> QuantRecipe:
    """`recipe` with another group size (the CLI's --group-size, e.g. 32 for the 64-wide tiny presets);
    the name says so. The gates stay the recipe's."""
    if recipe.weights.granularity != "per_group":
        raise BadInputError(
            f"recipe '{recipe.name}' quantizes weights {recipe.weights.granularity}: it has no groups.",
            file=recipe.source or None,
            field="--group-size",
            fix="use --group-size with a per_group recipe (int4-rtn, int4-awq).",
        )
    data = recipe.to_dict()
    data["weights"]["group_size"] = group_size
    data["name"] = f"{recipe.name}-g{group_size}"
    changed = QuantRecipe.from_dict(data, "--group-size")
    return replace(changed, source=recipe.source)


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

    def widened(g):
        return replace(
            g,
            max_mean_kl=round(g.max_mean_kl + KV_FP8_ALLOWANCE["max_mean_kl"], 6),
            min_top1=round(g.min_top1 - KV_FP8_ALLOWANCE["min_top1"], 6),
        )

    gates = widened(recipe.gates)
    if recipe.gates.max_ppl_increase is not None:
        gates = replace(
            gates, max_ppl_increase=round(gates.max_ppl_increase + KV_FP8_ALLOWANCE["max_ppl_increase"], 6)
        )
    if recipe.gates.random_weights is not None:
        gates = replace(gates, random_weights=widened(recipe.gates.random_weights))
    return replace(recipe, name=f"{recipe.name}+kv-{dtype}", kv_cache=KvCacheSpec(dtype), gates=gates)
