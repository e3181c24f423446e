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
# how an ExpertDispatch node reaches TensorRT (see qwen3_compile/lower/for_tensorrt.py):
# trt_moe: routing in-graph + TRT_MoE (IMoELayer); plugin: the project's CUDA plugin; dense: every expert
MOE_LOWERINGS = ("trt_moe", "plugin", "dense")
# decomposed: past/present concatenated, attention as MatMul/Softmax (what the export writes)
ATTENTION_FORMS = ("decomposed",)


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
    moe_lowerings: tuple[str, ...]
    attention: str

    @property
    def compute_capability(self) -> tuple[int, int]:
        major, minor = self.sm.split(".")
        return int(major), int(minor)

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
    for key, allowed in (
        ("precisions", PRECISIONS),
        ("tensorrt", TENSORRT_FLAVOURS),
        ("moe_lowerings", MOE_LOWERINGS),
        ("attention", ATTENTION_FORMS),
    ):
        values = raw[key] if isinstance(raw[key], list) else [raw[key]]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise BadInputError(
                f"unsupported value(s) {bad or values}.",
                file=source,
                field=key,
                fix=f"{key} from {', '.join(allowed)}.",
            )
    if "dense" not in raw["moe_lowerings"]:
        raise BadInputError(
            "'dense' must stay in the list: it is the lowering that needs nothing from the target.",
            file=source,
            field="moe_lowerings",
            fix='end the list with "dense".',
        )
    return Target(
        **{**raw, "precisions": tuple(raw["precisions"]), "moe_lowerings": tuple(raw["moe_lowerings"])}
    )


def target_to_dict(target: Target) -> dict:
    """The TOML fields of `target` (round-trips through `_decode`)."""
    data = dataclasses.asdict(target)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


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
