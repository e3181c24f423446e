"""Prefill/decode optimisation profiles: self-consistent shapes (mask = past + new) and profile choice."""

from __future__ import annotations

import pytest

from qwen3_compile.backends.tensorrt.profiles import (
    InputSpec,
    generation_profiles,
    profile_index,
    profiles_from_records,
)
from qwen3_compile.errors import BadInputError

INPUTS = [
    InputSpec("input_ids", (-1, -1)),
    InputSpec("attention_mask", (-1, -1)),
    InputSpec("position_ids", (-1, -1)),
    *(InputSpec(f"past_key_values.{i}.{kv}", (-1, 4, -1, 128)) for i in range(2) for kv in ("key", "value")),
]


@pytest.mark.parametrize("max_batch, max_seq", [(1, 2), (1, 4096), (8, 2048), (3, 333)])
def test_every_point_is_self_consistent(max_batch, max_seq):
    profiles = generation_profiles(INPUTS, max_batch, max_seq)
    assert [p.name for p in profiles] == ["prefill", "decode", "chunked"]
    for profile in profiles:
        for point in range(3):  # min, opt, max
            shape = {name: triple[point] for name, triple in profile.shapes.items()}
            batch, seq = shape["input_ids"]
            past = shape["past_key_values.0.key"][2]
            assert shape["attention_mask"] == (batch, past + seq)
            assert shape["position_ids"] == (batch, seq)
            assert all(shape[s.name] == (batch, 4, past, 128) for s in INPUTS[3:])
            assert 1 <= batch <= max_batch and past < max_seq and seq <= max_seq
            if profile.name != "chunked":
                assert past + seq <= max_seq
    prefill, decode, chunked = profiles
    assert prefill.shapes["input_ids"][2] == (max_batch, max_seq)
    assert decode.shapes["attention_mask"][2] == (max_batch, max_seq)
    assert decode.shapes["input_ids"][2][1] == 1
    assert chunked.shapes["input_ids"][2] == (max_batch, min(512, max_seq))


def test_profile_choice():
    profiles = generation_profiles(INPUTS, 4, 128)
    assert profile_index(profiles, 2, 100, 0) == 0  # prompt
    assert profile_index(profiles, 1, 1, 0) == 0  # one-token prompt: prefill admits it first
    assert profile_index(profiles, 4, 1, 127) == 1  # last decode step
    assert profile_index(profiles, 1, 100, 27) == 2  # the last chunk of a long prompt
    for batch, seq, past in [
        (5, 1, 0),
        (1, 129, 0),
        (1, 1, 128),
        (1, 129, 5),
    ]:  # too wide/long, chunk too big
        with pytest.raises(BadInputError, match="no optimisation profile"):
            profile_index(profiles, batch, seq, past)


def test_round_trip_through_manifest():
    profiles = generation_profiles(INPUTS, 2, 64)
    assert profiles_from_records([p.to_dict() for p in profiles]) == profiles


def test_refuses_tiny_limits_and_foreign_inputs():
    with pytest.raises(BadInputError):
        generation_profiles(INPUTS, 0, 64)
    with pytest.raises(BadInputError, match="outside the qwen3-compile contract"):
        generation_profiles([*INPUTS, InputSpec("pixel_values", (-1, 3, 224, 224))], 1, 64)
