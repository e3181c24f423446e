"""Reading safetensors headers without reading tensor data, and checking them against the file.

We parse the header ourselves (8-byte little-endian length, then JSON) so a truncated or corrupt file
is reported with the tensor and byte offsets involved, before any weights are touched. Loading tensor
data goes through the `safetensors` library (memory-mapped); nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from qwen3_compile.errors import BadInputError

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    # absolute byte range of the data in `file`
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorEntry]:
    """All tensors described in one safetensors file, checked against the file's size."""
    fix = "re-download or re-save the file (save_pretrained writes safetensors)."
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise BadInputError(
                    f"the file is {size} bytes, too short to be safetensors.", file=path, fix=fix
                )
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise BadInputError(
                    f"header length {header_len} does not fit in the {size}-byte file (truncated or not "
                    f"safetensors).",
                    file=path,
                    fix=fix,
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise BadInputError("the weight file is missing.", file=path, fix=fix) from None
    except PermissionError:
        raise BadInputError(
            "the weight file is not readable.", file=path, fix="check the file's permissions."
        ) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInputError(
            "the safetensors header is not valid JSON (corrupt file).", file=path, fix=fix
        ) from None
    if not isinstance(header, dict):
        raise BadInputError("the safetensors header is not a JSON object (corrupt file).", file=path, fix=fix)
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise BadInputError(
                f"tensor '{name}' has a malformed header entry.", file=path, fix=fix
            ) from None
        if dtype not in DTYPE_BYTES:
            raise BadInputError(f"tensor '{name}' has unknown dtype {dtype}.", file=path, fix=fix)
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != expected or begin < 0:
            raise BadInputError(
                f"tensor '{name}' ({dtype} {list(shape)}) should take {expected} bytes, the header says "
                f"{end - begin} (corrupt header).",
                file=path,
                fix=fix,
            )
        if end > data_size:
            raise BadInputError(
                f"the file is truncated: tensor '{name}' ends at byte {data_start + end} but the file has "
                f"{size} bytes.",
                file=path,
                fix=fix,
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
    return entries
