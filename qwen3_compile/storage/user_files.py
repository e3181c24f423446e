"""Opening the files a user hands us (checkpoints, recipes, calibration and prompt files, manifests): regular
files only, size-capped before reading, text as strict UTF-8, JSON strictly.

A named pipe, device or socket called config.json or model.safetensors (or a link to one) blocks
`open` or streams forever, so we refuse it before opening, open without blocking, and check the opened
descriptor again (the path may have been swapped in between). Links are followed: the Hugging Face cache
links every snapshot file to a blob.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from qwen3_compile.errors import BadInputError

MAX_CONFIG_BYTES = 4 << 20  # a published config.json is 1-2 kB
MAX_INDEX_BYTES = 64 << 20  # Qwen3-235B's shard index (37k tensors) is about 3 MB

_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)
SPECIAL_FIX = (
    "replace it with the real file: qwen3-compile reads regular files only (a pipe or device would block "
    "it or never end)."
)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _SPECIAL if test(mode)), "not a regular file")


def check_regular(path: Path, st: os.stat_result | None = None) -> None:
    """Refuse `path` unless it is (or links to) a regular file; `st` is an fstat of an opened file."""
    kind = _kind((st or os.stat(path)).st_mode)
    if kind is not None:
        raise BadInputError(f"the file is {kind}, not a regular file.", file=path, fix=SPECIAL_FIX)


def check_folder(directory: Path) -> None:
    """Refuse a checkpoint folder holding a pipe, device or socket: config, weights, tokenizer and side
    files are all read from its top level, and stages only check the files they open themselves."""
    for entry in sorted(directory.iterdir()):
        try:
            kind = _kind(os.stat(entry).st_mode)
        except OSError:  # a dangling link is a file nobody can read: as if absent
            continue
        if kind is not None and kind != "a directory":
            raise BadInputError(f"the file is {kind}, not a regular file.", file=entry, fix=SPECIAL_FIX)


def open_regular(path: Path, missing_fix: str) -> BinaryIO:
    """`path` opened for reading, only if it is a regular file (checked before and after opening)."""
    try:
        check_regular(path)
        # O_NONBLOCK: were it swapped for a pipe after the check, open returns instead of waiting
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadInputError("the file is missing.", file=path, fix=missing_fix) from None
    except PermissionError:
        raise BadInputError(
            "the file is not readable.", file=path, fix="check the file's permissions."
        ) from None
    except OSError as err:
        raise BadInputError(f"cannot open the file ({err.strerror}).", file=path, fix=SPECIAL_FIX) from None
    try:
        check_regular(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")  # O_NONBLOCK does nothing to reads of a regular file


def read_capped(stream: BinaryIO, max_bytes: int, name: str | Path, fix: str) -> bytes:
    """At most `max_bytes` from `stream` (a file or stdin); more is refused without reading it all."""
    raw = stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise BadInputError(
            f"the file is larger than the {max_bytes} bytes such a file can need.", file=name, fix=fix
        )
    return raw


def decode_text(raw: bytes, name: str | Path) -> str:
    """`raw` as strict UTF-8 text."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(
            f"the file is not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x}).",
            file=name,
            fix="save it as UTF-8 text.",
        ) from None


def read_bytes(path: Path, max_bytes: int, missing_fix: str, fix: str) -> bytes:
    """The bytes of the regular file `path`, refusing files over `max_bytes` before reading them."""
    with open_regular(path, missing_fix) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise BadInputError(
                f"the file is {size} bytes, more than the {max_bytes} such a file can need.",
                file=path,
                fix=fix,
            )
        return read_capped(f, max_bytes, path, fix)  # it may have grown since


def read_text(path: Path, max_bytes: int, missing_fix: str, fix: str) -> str:
    """The UTF-8 text of the regular file `path`, at most `max_bytes`."""
    return decode_text(read_bytes(path, max_bytes, missing_fix, fix), path)


def read_json_object(path: Path, max_bytes: int, missing_fix: str, fix: str) -> dict[str, Any]:
    """The JSON object in the regular file `path`, at most `max_bytes`, parsed strictly."""
    return parse_json_object(read_bytes(path, max_bytes, missing_fix, fix), path, "the file", fix)


class _Refused(ValueError):
    def __init__(self, problem: str, field: str | None = None):
        super().__init__(problem)
        self.problem, self.field = problem, field


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:  # json keeps the last silently; a writer that repeats a key is broken
            raise _Refused(f"key '{key}' appears twice.", key)
        obj[key] = value
    return obj


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number (JSON has no NaN or Infinity).")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"{text} overflows a 64-bit float.")
    return value


def parse_json_object(raw: bytes, path: Path, what: str, fix: str) -> dict[str, Any]:
    """`raw` as a JSON object: strict UTF-8, no NaN/Infinity (nor numbers that overflow to it), no
    duplicate keys, bounded nesting; every failure a BadInputError naming `path`."""
    try:
        value = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_object, parse_constant=_constant, parse_float=_float
        )
    except UnicodeDecodeError as err:
        problem, field = f"{what} is not UTF-8 text (byte {err.start}).", None
    except json.JSONDecodeError as err:
        problem, field = f"{what} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).", None
    except _Refused as err:
        problem, field = f"{what} is not valid JSON: {err.problem}", err.field
    except ValueError as err:  # an integer of thousands of digits
        problem, field = f"{what} is not usable JSON ({err}).", None
    except RecursionError:
        problem, field = f"{what} nests arrays or objects too deeply.", None
    else:
        if isinstance(value, dict):
            return value
        problem, field = f"{what} must hold a JSON object, not {type(value).__name__}.", None
    raise BadInputError(problem, file=path, field=field, fix=fix)
