"""Reading safetensors headers without reading tensor data, and checking them against the file.

We parse the header ourselves (8-byte little-endian length, then JSON) so a truncated or corrupt file
is reported with the tensor and byte offsets involved, before any weights are touched. Loading a whole
state dict goes through the `safetensors` library (memory-mapped); the exporter streams tensors in row
blocks through `ShardReader` (positioned reads into a small buffer: a memory map of a file that shrinks
mid-stream kills the process with SIGBUS, a short read is an error we can name). Nothing here
unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3_compile.errors import BadInputError

if TYPE_CHECKING:
    import torch

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


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]


class ShardReader:
    """Reads row blocks of tensors from safetensors files; each file is opened once and kept open until
    `close` (the exporter closes after every layer, so a shard that disappears is noticed)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, entry: TensorEntry) -> int:
        fd = self._fds.get(entry.file)
        if fd is None:
            try:
                fd = os.open(entry.file, os.O_RDONLY)
            except OSError as err:
                raise BadInputError(
                    f"cannot read tensor '{entry.name}': the weight file {err.strerror.lower()} "
                    f"(it was there when the export started).",
                    file=entry.file,
                    field=entry.name,
                    fix="restore the file, then rerun the export with --resume.",
                ) from None
            self._fds[entry.file] = fd
        return fd

    def read_rows(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor viewed as 2-D [rows, last dim] (1-D tensors: one row)."""
        import torch

        cols = entry.shape[-1] if entry.shape else 1
        row_bytes = cols * DTYPE_BYTES[entry.dtype]
        begin, nbytes = entry.begin + start * row_bytes, (stop - start) * row_bytes
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view, done, fd = memoryview(buffer.numpy()), 0, self._fd(entry)
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], begin + done)
            if got == 0:
                size = os.fstat(fd).st_size
                raise BadInputError(
                    f"tensor '{entry.name}' is cut off: it needs bytes {entry.begin}-{entry.end} but the "
                    f"file now ends at byte {size} (truncated after the export started).",
                    file=entry.file,
                    field=entry.name,
                    fix="restore the file (re-download or re-save it), then rerun the export with --resume.",
                )
            done += got
        return buffer.view(torch_dtype(entry.dtype)).reshape(stop - start, cols)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
