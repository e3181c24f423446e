"""Reading safetensors headers without reading tensor data, and checking them against the file.

We parse the header ourselves (8-byte little-endian length, then JSON) so a truncated or corrupt file
is reported with the tensor and byte offsets involved, before any weights are touched. The checks are
the safetensors library's own (typed entries, 64-bit shapes, tensors tiling the data area exactly), so
what we accept it loads; files are opened only when regular (models/files.py). Loading a whole
state dict goes through the `safetensors` library (memory-mapped); the exporter streams tensors in row
blocks through `ShardReader` (positioned reads into a small buffer: a memory map of a file that shrinks
mid-stream kills the process with SIGBUS, a short read is an error we can name). Nothing here
unpickles anything.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.user_files import check_regular, open_regular, parse_json_object

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
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


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


HEADER_FIX = (
    "the file is corrupt or not safetensors: re-download or re-save it (save_pretrained writes safetensors)."
)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """All tensors described in one safetensors file, checked against the file's size."""
    with open_regular(path, HEADER_FIX) as f:
        size = os.fstat(f.fileno()).st_size
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise BadInputError(
                f"the file is {size} bytes, too short to be safetensors.", file=path, fix=HEADER_FIX
            )
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES:
            raise BadInputError(
                f"the header claims {header_len} bytes, more than the {_MAX_HEADER_BYTES} a header can need.",
                file=path,
                fix=HEADER_FIX,
            )
        if header_len > size - 8:
            raise BadInputError(
                f"header length {header_len} does not fit in the {size}-byte file (truncated or not "
                f"safetensors).",
                file=path,
                fix=HEADER_FIX,
            )
        raw = f.read(header_len)
    header = parse_json_object(raw, path, "the safetensors header", HEADER_FIX)
    return parse_header(header, path, 8 + header_len, size)


def parse_header(header: dict[str, Any], path: Path, data_start: int, size: int) -> dict[str, TensorEntry]:
    """The header's tensors, which must tile the data area exactly (as the safetensors library requires)."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInputError(
            "__metadata__ must map names to strings.", file=path, field="__metadata__", fix=HEADER_FIX
        )
    entries = [
        _entry(name, info, path, data_start, size) for name, info in header.items() if name != "__metadata__"
    ]
    end = data_start
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != end:
            problem = "overlaps another tensor" if entry.begin < end else f"leaves a gap at byte {end}"
            raise BadInputError(
                f"tensor '{entry.name}' (bytes {entry.begin}-{entry.end}) {problem} (corrupt header).",
                file=path,
                field=entry.name,
                fix=HEADER_FIX,
            )
        end = entry.end
    if end != size:
        raise BadInputError(
            f"the tensors end at byte {end}, the file has {size} bytes (trailing bytes: corrupt file).",
            file=path,
            fix=HEADER_FIX,
        )
    return {e.name: e for e in entries}


def _entry(name: str, info: Any, path: Path, data_start: int, size: int) -> TensorEntry:
    def refuse(problem: str) -> BadInputError:
        return BadInputError(f"tensor '{name}' {problem}", file=path, field=name, fix=HEADER_FIX)

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise refuse("has a malformed header entry (needs exactly dtype, shape and data_offsets).")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise refuse(f"has unknown dtype {dtype!r}.")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 64 for d in shape):
        raise refuse(f"has shape {shape!r}; a shape is a list of non-negative 64-bit integers.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise refuse(f"has data_offsets {offsets!r}; they are two integers [begin, end].")
    # the loader multiplies dims left to right in 64 bits: [2**32, 2**32, 0] overflows there, not here
    if any(math.prod(shape[: i + 1]) >= 1 << 64 for i in range(len(shape))):
        raise refuse(f"has shape {shape!r}, whose element count overflows 64 bits.")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if begin < 0 or end - begin != expected:
        raise refuse(
            f"({dtype} {shape}) should take {expected} bytes, the header says bytes {begin}-{end} "
            f"(corrupt header)."
        )
    if data_start + end > size:
        raise refuse(
            f"is cut off: the file is truncated, the tensor ends at byte {data_start + end} but the file "
            f"has {size} bytes."
        )
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


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
                # O_NONBLOCK and fstat: a file swapped for a pipe since open_checkpoint must not block us
                fd = os.open(entry.file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    check_regular(entry.file, os.fstat(fd))
                except BadInputError:
                    os.close(fd)
                    raise
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
