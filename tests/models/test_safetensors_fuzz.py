"""Property tests of the safetensors header parser: whatever bytes a weight file holds, `read_header`
either returns entries that tile the file exactly, which the safetensors library then opens with the same
dtypes and shapes, or raises BadInputError naming the file; never another exception, never slowly.
Inputs: random bytes, random edits of a valid file's bytes and length field, random JSON in its header."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.safetensors_index import DTYPE_BYTES, read_header

VALID = save(
    {
        "a": torch.zeros(4, 3),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.tensor(7),
        "d": torch.zeros(0, 2, dtype=torch.float16),
    },
    metadata={"format": "pt"},
)
(HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
HEADER = json.loads(VALID[8 : 8 + HEADER_LEN])
DATA = VALID[8 + HEADER_LEN :]

# database=None: nothing written into the repository; 0.5 s per example is ~100x what a read takes
FUZZ = settings(max_examples=300, deadline=500, database=None)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-2, len(VALID) + 2)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(sorted(DTYPE_BYTES))
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# shapes and offsets near the edges: zero-size tensors whose other dimensions overflow 64 bits
edge_ints = st.sampled_from([0, 1, 2, 3, 2**32, 2**62, 2**63, 2**64 - 1, 2**64]) | st.integers(
    -2, len(VALID) + 2
)
edge_lists = st.lists(edge_ints, max_size=4)


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "model.safetensors"


def check(path, data: bytes) -> None:
    """The property, for one file's bytes."""
    path.write_bytes(data)
    try:
        entries = read_header(path)
    except BadInputError as err:
        assert err.file == str(path) and err.exit_code == 2 and err.fix
        return
    # accepted: the tensors tile the data area exactly ...
    spans = sorted((e.begin, e.end) for e in entries.values())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    assert [b for b, _ in spans] == [start] + [e for _, e in spans[:-1]] and (
        spans[-1][1] if spans else start
    ) == len(data)
    for e in entries.values():
        assert e.nbytes == math.prod(e.shape) * DTYPE_BYTES[e.dtype]
    # ... and the loader users run agrees
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(entries)
        for name, e in entries.items():
            assert (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) == (e.dtype, e.shape)


def test_the_valid_file_is_accepted(weight_file):
    weight_file.write_bytes(VALID)
    assert set(read_header(weight_file)) == {"a", "b", "c", "d"}


@FUZZ
@given(st.binary(max_size=2048) | st.binary(max_size=512).map(lambda b: struct.pack("<Q", len(b)) + b))
def test_random_bytes(weight_file, data):
    check(weight_file, data)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(VALID)),
    st.binary(max_size=16),
)
def test_byte_edits_of_a_valid_file(weight_file, flips, cut, tail):
    data = bytearray(VALID)
    for at, value in flips:
        data[at] = value
    check(weight_file, bytes(data[:cut]) + tail)


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_any_header_length(weight_file, length):
    check(weight_file, struct.pack("<Q", length) + VALID[8:])


@settings(FUZZ, max_examples=600)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*sorted(HEADER), "new"]),
            st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]),  # None: the whole entry
            json_values,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_random_json_in_the_header(weight_file, edits):
    header = json.loads(json.dumps(HEADER))
    for target, key, value in edits:
        if key is not None and isinstance(header.get(target), dict):
            header[target][key] = value
        else:
            header[target] = value
    raw = json.dumps(header).encode()  # NaN and Infinity come out as JS literals
    check(weight_file, struct.pack("<Q", len(raw)) + raw + DATA)


@FUZZ
@given(st.sampled_from(sorted(set(HEADER) - {"__metadata__"})), edge_lists, edge_lists)
def test_shapes_and_offsets_at_the_edges(weight_file, name, shape, offsets):
    header = json.loads(json.dumps(HEADER))
    header[name]["shape"] = shape
    if len(offsets) == 2:
        header[name]["data_offsets"] = offsets
    raw = json.dumps(header).encode()
    check(weight_file, struct.pack("<Q", len(raw)) + raw + DATA)
