"""Deployment targets: devices described as data in `recipes/targets/*.toml`, decoded strictly (schema.py)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Literal, get_args

from qwen3_compile.errors import BadInputError
from qwen3_compile.schema import decode, encode

Precision = Literal["fp16", "fp8", "int8", "int4"]
# how an ExpertDispatch node reaches TensorRT (see qwen3_compile/lower/for_tensorrt.py):
# trt_moe: routing in-graph + TRT_MoE (IMoELayer); plugin: the project's CUDA plugin; dense: every expert
MoeLowering = Literal["trt_moe", "plugin", "dense"]
PRECISIONS = get_args(Precision)
MOE_LOWERINGS = get_args(MoeLowering)


@dataclass(frozen=True, kw_only=True)
class Target:
    name: str
    description: str
    sm: str = field(metadata={"pattern": r"\d+\.\d+"})
    memory_gb: float = field(metadata={"min": 0.5, "max": 4096})
    reserved_gb: float = field(metadata={"min": 0, "max": 4096})
    unified_memory: bool
    tensorrt: Literal["tensorrt", "tensorrt-rtx"]
    min_tensorrt: str = field(metadata={"pattern": r"\d+(\.\d+)*"})
    precisions: tuple[Precision, ...]
    moe_lowerings: tuple[MoeLowering, ...]
    # decomposed: past/present concatenated, attention as MatMul/Softmax (what the export writes)
    attention: Literal["decomposed"]

    @property
    def compute_capability(self) -> tuple[int, int]:
        major, minor = self.sm.split(".")
        return int(major), int(minor)

    @property
    def usable_gb(self) -> float:
        return self.memory_gb - self.reserved_gb


def _decode(raw: dict, source: str) -> Target:
    target = decode(Target, raw, file=source)
    for key in ("precisions", "moe_lowerings"):
        if not getattr(target, key):
            raise BadInputError(
                "the list is empty.", file=source, field=key, fix=f"list at least one {key[:-1]}."
            )
    if "dense" not in target.moe_lowerings:
        raise BadInputError(
            "'dense' must stay in the list: it is the lowering that needs nothing from the target.",
            file=source,
            field="moe_lowerings",
            fix='end the list with "dense".',
        )
    if target.reserved_gb >= target.memory_gb:
        raise BadInputError(
            f"reserved_gb {target.reserved_gb} leaves nothing of memory_gb {target.memory_gb}.",
            file=source,
            field="reserved_gb",
            fix="reserve less than the device's memory.",
        )
    return target


def target_to_dict(target: Target) -> dict:
    """The TOML fields of `target` (round-trips through `_decode`)."""
    return encode(target)


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
