"""One strict decoder for every data file the toolchain reads: recipes, deployment targets and manifests.

`decode(cls, data, file=...)` turns JSON/TOML data into a frozen dataclass by its type hints and refuses,
naming the file and the dotted field, anything the class does not describe: an unknown or missing key, a
wrong type (a string where a list is expected, a bool where a number is), a NaN or infinite number, a value
outside a field's `min`/`max` (exclusive: `above`/`below`) metadata, not matching its `pattern` or not
among its `Literal` choices.
`encode(obj)` is its inverse (tuples as lists), so `decode(type(x), encode(x)) == x`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from qwen3_compile.errors import BadInputError

T = TypeVar("T")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fail(problem: str, file: str | Path | None, path: str, fix: str) -> BadInputError:
    return BadInputError(problem, file=file, field=path or None, fix=fix)


def _name(tp: Any) -> str:
    if tp is Any:
        return "any JSON value"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list, each item {_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a table, each value {_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _finite(value: Any, file, path: str) -> Any:
    """Free-form JSON (typed Any) is taken as is, except non-finite numbers anywhere inside it."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(f"{value} is not a finite number.", file, path, "give a finite number.")
    if isinstance(value, dict):
        return {k: _finite(v, file, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v, file, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _value(tp: Any, value: Any, file, path: str, meta: typing.Mapping[str, Any]) -> Any:
    if tp is Any:
        return _finite(value, file, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _value(option, value, file, path, meta)
            except BadInputError as err:
                errors.append(err)
        if len(options) == 1:
            raise errors[0]
        raise _fail(f"{value!r} is not {_name(tp)}.", file, path, f"give {_name(tp)}.")
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise _fail(f"{value!r} is not allowed.", file, path, f"use {_name(tp)}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _fail(f"{value!r} is not a list.", file, path, f"give {_name(tp)}, e.g. [...]")
        items = [_value(args[0], v, file, f"{path}[{i}]", {}) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(f"{value!r} is not a table.", file, path, f"give {_name(tp)}.")
        return {str(k): _value(args[1], v, file, f"{path}.{k}", {}) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return decode(tp, value, file=file, path=path)
    return _scalar(tp, value, file, path, meta)


def _scalar(tp: type, value: Any, file, path: str, meta: typing.Mapping[str, Any]) -> Any:
    ok = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
    }.get(tp)
    if ok is None:
        raise TypeError(f"schema: unsupported field type {tp!r} at {path}")
    if not ok:
        raise _fail(f"{value!r} is not {_name(tp)}.", file, path, f"give {_name(tp)}.")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise _fail(f"{value} is not a finite number.", file, path, "give a finite number.")
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"from {low}" if high is None else f"up to {high}" if low is None else f"from {low} to {high}"
        )
        raise _fail(f"{value!r} is out of range.", file, path, f"use a value {bounds}.")
    above, below = meta.get("above"), meta.get("below")  # exclusive bounds: eps in (0, 1), theta > 0
    if (above is not None and not value > above) or (below is not None and not value < below):
        bounds = " and ".join(f"{w} {b}" for w, b in (("above", above), ("below", below)) if b is not None)
        raise _fail(f"{value!r} is out of range.", file, path, f"use a value {bounds}.")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise _fail(f"{value!r} is not of the form {meta['pattern']}.", file, path, "see the other files.")
    if "choices" in meta and value not in meta["choices"]:
        raise _fail(f"{value!r} is not allowed.", file, path, f"use one of: {', '.join(meta['choices'])}.")
    return value


def decode(cls: type[T], data: Any, *, file: str | Path | None = None, path: str = "") -> T:
    """`data` (a mapping from JSON or TOML) as an instance of the dataclass `cls`, checked field by field."""
    where = path or "the top level"
    if not isinstance(data, dict):
        raise _fail(f"{where} is not a table.", file, path, f"give a table with {_keys(cls)}.")
    fields = {f.name: f for f in _data_fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise _fail(f"unknown key {unknown[0]!r}.", file, key, f"the keys here are: {_keys(cls)}.")
    hints = _hints(cls)
    values = {}
    for name, spec in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise _fail("a required key is missing.", file, key, f"add {name} ({_name(hints[name])}).")
            continue
        values[name] = _value(hints[name], data[name], file, key, spec.metadata)
    return cls(**values)


def _data_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a file holds: not those marked `internal` (e.g. where a recipe was read from)."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in _data_fields(cls))


def encode(obj: Any, drop_none: bool = False) -> Any:
    """JSON-ready data of a dataclass (or a value inside one); `drop_none` leaves `None` fields out (TOML
    has no null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: encode(getattr(obj, f.name), drop_none)
            for f in _data_fields(type(obj))
            if not (drop_none and getattr(obj, f.name) is None)
        }
    if isinstance(obj, list | tuple):
        return [encode(v, drop_none) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v, drop_none) for k, v in obj.items()}
    return obj
