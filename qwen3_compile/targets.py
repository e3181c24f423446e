"""Deployment targets: devices described as data in `recipes/targets/*.toml`, decoded via an allow-list."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from qwen3_compile.errors import BadInputError

PRECISIONS = ("fp16", "fp8", "int8", "int4")
TENSORRT_FLAVOURS = ("tensorrt", "tensorrt-rtx")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    sm: str
    memory_gb: float
    reserved_gb: float
    unified_memory: bool
    tensorrt: str
    min_tensorrt: str
    precisions: tuple[str, ...]

    @property
    def usable_gb(self) -> float:
        return self.memory_gb - self.reserved_gb


def _decode(raw: dict, source: str) -> Target:
    fields = {f.name for f in dataclasses.fields(Target)}
    unknown = set(raw) - fields
    missing = fields - set(raw)
    if unknown or missing:
        raise BadInputError(
            f"unknown keys {sorted(unknown)} / missing keys {sorted(missing)}.",
            file=source,
            fix=f"a target file has exactly these keys: {', '.join(sorted(fields))}.",
        )
    bad = [p for p in raw["precisions"] if p not in PRECISIONS]
    if bad or raw["tensorrt"] not in TENSORRT_FLAVOURS:
        raise BadInputError(
            f"unsupported precision {bad} or TensorRT flavour '{raw['tensorrt']}'.",
            file=source,
            field="precisions / tensorrt",
            fix=f"precisions from {PRECISIONS}, tensorrt from {TENSORRT_FLAVOURS}.",
        )
    return Target(**{**raw, "precisions": tuple(raw["precisions"])})


@cache
def all_targets() -> dict[str, Target]:
    folder = resources.files("qwen3_compile").joinpath("recipes", "targets")
    targets = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            target = _decode(tomllib.loads(entry.read_text()), f"recipes/targets/{entry.name}")
            targets[target.name] = target
    return targets


def get_target(name: str) -> Target:
    targets = all_targets()
    if name not in targets:
        raise BadInputError(
            f"unknown deployment target '{name}'.", field="target", fix=f"use one of: {', '.join(targets)}."
        )
    return targets[name]
