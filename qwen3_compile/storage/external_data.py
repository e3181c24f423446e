"""Weights streamed straight into an ONNX external-data file, never held in the protobuf.

Large exports write each initializer's bytes to `model.onnx.data` as the graph is built, layer by layer
(`weights.py` streams them from the checkpoint in row blocks), so no export holds the model in memory.
Rewrites read external tensors through a read-only memory map and append what they create; `compact`
rewrites the file with only the tensors the final graph uses (rewrites leave the replaced ones behind),
copying in bounded chunks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGNMENT = 4096  # aligned offsets let runtimes map tensors directly
MIN_EXTERNAL_BYTES = 1024
_CHUNK = 64 << 20


def pack_int4(values: np.ndarray) -> np.ndarray:
    """INT4 values (any integer or `ml_dtypes.int4` array in [-8, 7], or uint4 in [0, 15]) as ONNX stores
    them: flattened, two a byte, the first of each pair in the low nibble, an odd count padded with a zero
    high nibble."""
    flat = np.asarray(values).reshape(-1).astype(np.int8).view(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...], signed: bool = True) -> np.ndarray:
    """`pack_int4`'s inverse: int8 values in `shape` (INT4: sign-extended; UINT4, `signed=False`: 0..15)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[
        : int(np.prod(shape, dtype=np.int64))
    ]
    if not signed:
        return nibbles.astype(np.int8).reshape(shape)
    return ((nibbles.astype(np.int8) ^ 8) - 8).reshape(shape)  # sign-extend 4 bits


def raw_view(tensor: Any) -> tuple[memoryview, int, list[int]]:
    """(bytes view without a copy where possible, ONNX element type, dims) of a torch tensor or array."""
    from qwen3_compile.graph_contract import ONNX_DTYPES

    if isinstance(tensor, np.ndarray) and tensor.dtype in (ml_dtypes.int4, ml_dtypes.uint4):  # packed: a copy
        kind = TensorProto.INT4 if tensor.dtype == ml_dtypes.int4 else TensorProto.UINT4
        return memoryview(pack_int4(tensor)), kind, list(tensor.shape)
    if isinstance(tensor, np.ndarray) and tensor.dtype == ml_dtypes.float8_e4m3fn:
        array = np.ascontiguousarray(tensor).view(np.uint8)
        return memoryview(array).cast("B"), TensorProto.FLOAT8E4M3FN, list(tensor.shape)

    if hasattr(tensor, "detach"):
        import torch

        t = tensor.detach().contiguous().cpu()
        view_dtype = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}.get(t.dtype, t.dtype)
        array = t.view(view_dtype).numpy()
        return memoryview(array).cast("B"), ONNX_DTYPES[str(t.dtype).removeprefix("torch.")], list(t.shape)
    array = np.ascontiguousarray(tensor)
    return memoryview(array).cast("B"), ONNX_DTYPES[str(array.dtype)], list(array.shape)


def _external_proto(
    name: str, elem_type: int, dims: list[int], location: str, offset: int, length: int
) -> TensorProto:
    proto = TensorProto(name=name, data_type=elem_type, dims=dims)
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        proto.external_data.add(key=key, value=value)
    return proto


class ExternalDataWriter:
    """Appends tensors to one data file and returns protos that point at them.

    Writes are positioned (`pwrite`), so a tensor can be filled in pieces and out of order (a transposed
    weight streamed block by block); padding between tensors is left as a hole (reads as zeros).
    `resume_from`: the file already holds that many valid bytes from an interrupted export; tensors that
    end within them are replayed (their protos rebuilt, nothing read or written) and anything the
    interrupted run wrote after them is cut off.
    """

    def __init__(self, path: Path, resume_from: int = 0):
        self.path = Path(path)
        self.location = self.path.name
        flags = os.O_WRONLY | os.O_CREAT | (0 if resume_from else os.O_TRUNC)
        self.fd = os.open(self.path, flags, 0o644)
        if resume_from:
            os.ftruncate(self.fd, resume_from)
        self.resume_from = resume_from
        self.offset = 0

    def reserve(
        self, name: str, elem_type: int, dims: list[int], nbytes: int
    ) -> tuple[TensorProto, int | None]:
        """A proto for `nbytes` at the next aligned offset, and the offset to write them at (None when a
        resumed file already holds them)."""
        start = self.offset + -self.offset % ALIGNMENT
        self.offset = start + nbytes
        proto = _external_proto(name, elem_type, dims, self.location, start, nbytes)
        if self.offset <= self.resume_from:
            return proto, None
        if start < self.resume_from:
            raise RuntimeError(f"resume point {self.resume_from} falls inside tensor '{name}'")
        return proto, start

    def write_at(self, offset: int, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" else data
        while data.nbytes:
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written

    def add(self, name: str, tensor: Any) -> TensorProto:
        data, elem_type, dims = raw_view(tensor)
        if data.nbytes < MIN_EXTERNAL_BYTES:
            proto = TensorProto(name=name, data_type=elem_type, dims=dims)
            proto.raw_data = data.tobytes()
            return proto
        proto, at = self.reserve(name, elem_type, dims, data.nbytes)
        if at is not None:
            self.write_at(at, data)
        return proto

    def sync(self) -> None:
        """Make what was written durable (before a journal entry claims it)."""
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def _info(proto: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in proto.external_data}


def external_array(proto: TensorProto, base_dir: Path) -> np.ndarray:
    """A read-only memory map of an external tensor (no copy)."""
    info = _info(proto)
    count = int(np.prod(proto.dims, dtype=np.int64))
    if proto.data_type in (TensorProto.INT4, TensorProto.UINT4):  # two a byte: unpacked into memory (a copy)
        packed = np.memmap(
            base_dir / info["location"],
            np.uint8,
            mode="r",
            offset=int(info.get("offset", 0)),
            shape=((count + 1) // 2,),
        )
        signed = proto.data_type == TensorProto.INT4
        values = unpack_int4(packed, tuple(proto.dims), signed)
        return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    dtype = helper.tensor_dtype_to_np_dtype(proto.data_type)
    mapped = np.memmap(
        base_dir / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=(count,)
    )
    return mapped.reshape(tuple(proto.dims))


def live_bytes(model: onnx.ModelProto) -> int:
    return sum(
        int(_info(t)["length"]) for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
    )


def compact(model: onnx.ModelProto, base_dir: Path, location: str) -> None:
    """Rewrite `base_dir/location` to hold only the tensors `model` references, in order, in chunks."""
    source = base_dir / location
    if not source.exists() or source.stat().st_size <= live_bytes(model) + ALIGNMENT * len(
        model.graph.initializer
    ):
        return
    target = source.with_name(source.name + ".compact")
    offset = 0
    with source.open("rb") as src, target.open("wb") as dst:
        for proto in model.graph.initializer:
            if proto.data_location != TensorProto.EXTERNAL:
                continue
            info = _info(proto)
            pad = -offset % ALIGNMENT
            dst.write(b"\0" * pad)
            offset += pad
            src.seek(int(info.get("offset", 0)))
            remaining = int(info["length"])
            new_offset = offset
            while remaining:
                block = src.read(min(_CHUNK, remaining))
                dst.write(block)
                remaining -= len(block)
                offset += len(block)
            del proto.external_data[:]
            for key, value in (
                ("location", location),
                ("offset", str(new_offset)),
                ("length", info["length"]),
            ):
                proto.external_data.add(key=key, value=value)
    target.replace(source)
