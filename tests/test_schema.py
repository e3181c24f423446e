"""The strict decoder on small dataclasses: each rule, the dotted field it names, and the round trip."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from qwen3_compile.errors import BadInputError
from qwen3_compile.schema import decode, encode


@dataclass(frozen=True, kw_only=True)
class Inner:
    ratio: float = field(metadata={"min": 0.0, "max": 1.0})
    names: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Outer:
    count: int = field(metadata={"min": 1, "max": 4096})
    mode: Literal["a", "b"] = "a"
    inner: Inner
    extra: dict[str, Any] | None = None
    flag: bool = False


GOOD = {"count": 3, "mode": "b", "inner": {"ratio": 0.5, "names": ["x", "y"]}, "extra": {"k": [1, 2.5]}}


def test_decodes_and_round_trips():
    value = decode(Outer, GOOD, file="f.json")
    assert value == Outer(count=3, mode="b", inner=Inner(ratio=0.5, names=("x", "y")), extra={"k": [1, 2.5]})
    assert decode(Outer, encode(value)) == value
    assert decode(Outer, {"count": 1, "inner": {"ratio": 1}}).inner.ratio == 1.0  # an int is a float


@pytest.mark.parametrize(
    "change, field_path",
    [
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d.pop("count"), "count"),
        (lambda d: d.update(count="3"), "count"),
        (lambda d: d.update(count=True), "count"),  # a bool is not a number
        (lambda d: d.update(count=1e9), "count"),  # a float is not an int
        (lambda d: d.update(count=1_000_000_000), "count"),  # out of range
        (lambda d: d.update(count=0), "count"),
        (lambda d: d.update(mode="c"), "mode"),
        (lambda d: d.update(flag=1), "flag"),
        (lambda d: d["inner"].update(ratio=math.nan), "inner.ratio"),
        (lambda d: d["inner"].update(ratio=math.inf), "inner.ratio"),
        (lambda d: d["inner"].update(ratio=-0.1), "inner.ratio"),
        (lambda d: d["inner"].update(names="xy"), "inner.names"),  # a string is not a list of strings
        (lambda d: d["inner"].update(names=["x", 2]), "inner.names[1]"),
        (lambda d: d["extra"].update(k=[1, math.nan]), "extra.k[1]"),  # free-form JSON: still finite
        (lambda d: d.update(inner=[0.5]), "inner"),
    ],
)
def test_each_rule_names_the_field(change, field_path):
    import copy

    data = copy.deepcopy(GOOD)
    change(data)
    with pytest.raises(BadInputError) as info:
        decode(Outer, data, file="recipe.toml")
    assert info.value.field == field_path
    assert info.value.exit_code == 2 and "recipe.toml" in info.value.message and info.value.fix


def test_top_level_must_be_a_table():
    with pytest.raises(BadInputError, match="not a table"):
        decode(Outer, [GOOD], file="x.json")
