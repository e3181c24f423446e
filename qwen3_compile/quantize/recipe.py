"""Quantization recipes: versioned data (`recipes/quant/*.toml`) decoded into frozen config objects
through an allow-list; unknown names or fields are errors that list the valid ones."""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError

WEIGHT_DTYPES = ("int8",)
GRANULARITIES = ("per_channel",)
RECIPE_VERSION = 1


@dataclass(frozen=True)
class WeightSpec:
    dtype: str = "int8"
    granularity: str = "per_channel"


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
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
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
        if weights.dtype not in WEIGHT_DTYPES or weights.granularity not in GRANULARITIES:
            raise BadInputError(
                f"weights {weights.dtype}/{weights.granularity} is not supported.",
                file=source,
                field="weights",
                fix=f"dtype from {WEIGHT_DTYPES}, granularity from {GRANULARITIES}.",
            )
        return cls(
            name=data["name"],
            version=data["version"],
            description=data["description"],
            min_sm=data["min_sm"],
            weights=weights,
            select=section("select", Selection),
            gates=section("gates", RecipeGates),
            source=source,
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
