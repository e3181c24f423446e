"""Deployment targets as data: round trip, allow-list errors, and the facts the build relies on."""

from __future__ import annotations

import importlib.util

import pytest

from qwen3_compile.errors import BadInputError
from qwen3_compile.targets import _decode, all_targets, get_target, target_to_dict

needs_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt_rtx: pip install '.[rtx]'"
)

ISSUE_TARGETS = {
    # name: (SM, flavour, GB) as the issue lists them
    "jetson-orin-nano": ("8.7", "tensorrt", 8.0),
    "jetson-agx-orin": ("8.7", "tensorrt", 64.0),
    "jetson-thor": ("11.0", "tensorrt", 128.0),
    "h100": ("9.0", "tensorrt", 80.0),
    "h200": ("9.0", "tensorrt", 141.0),
    "rtx-ada": ("8.9", "tensorrt-rtx", 24.0),
    "rtx-blackwell": ("12.0", "tensorrt-rtx", 32.0),
    "dgx-spark": ("12.1", "tensorrt", 128.0),
}


@pytest.mark.parametrize("name", sorted(all_targets()))
def test_round_trip(name):
    target = get_target(name)
    assert _decode(target_to_dict(target), "round-trip") == target


def test_issue_targets_present():
    for name, (sm, flavour, memory) in ISSUE_TARGETS.items():
        target = get_target(name)
        assert (target.sm, target.tensorrt, target.memory_gb) == (sm, flavour, memory)
        assert 0 < target.usable_gb < target.memory_gb


def test_native_trt_moe_only_where_imoelayer_exists():
    # IMoELayer: SM 10.x/11.x with TensorRT >= 10.16 (DESIGN.md section 3); Orin/JetPack 6.2 is TensorRT 10.3
    for target in all_targets().values():
        if "trt_moe" in target.moe_lowerings:
            assert target.compute_capability[0] in (10, 11) and target.tensorrt == "tensorrt"
        assert target.moe_lowerings[-1] == "dense"
    assert get_target("jetson-thor").moe_lowerings[0] == "trt_moe"
    assert "fp8" not in get_target("jetson-orin-nano").precisions


@needs_rtx
def test_rtx_targets_are_tensorrt_rtx_compute_capabilities():
    import tensorrt_rtx as trt

    for target in all_targets().values():
        if target.tensorrt == "tensorrt-rtx":
            major, minor = target.compute_capability
            assert hasattr(trt.ComputeCapability, f"SM{major}{minor}"), target.name


def test_unknown_target_lists_valid_ones():
    with pytest.raises(BadInputError) as info:
        get_target("rtx-9090")
    assert all(name in info.value.message for name in ISSUE_TARGETS)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"moe_lowerings": ["plugin", "magic"]}, "moe_lowerings[1]"),
        ({"moe_lowerings": ["plugin"]}, "moe_lowerings"),  # dense must stay as the last resort
        ({"attention": "paged"}, "attention"),
        ({"tensorrt": "tensorrt-llm"}, "tensorrt"),
        ({"precisions": ["fp16", "nvfp4"]}, "precisions[1]"),
        ({"precisions": "fp16"}, "precisions"),  # a string is not a list
        ({"precisions": []}, "precisions"),
        ({"memory_gb": float("nan")}, "memory_gb"),
        ({"memory_gb": -8}, "memory_gb"),
        ({"reserved_gb": 24.0}, "reserved_gb"),  # nothing left
        ({"sm": "ada"}, "sm"),
        ({"unified_memory": "yes"}, "unified_memory"),
    ],
)
def test_allow_list(change, field):
    raw = target_to_dict(get_target("rtx-ada")) | change
    with pytest.raises(BadInputError) as info:
        _decode(raw, "bad.toml")
    assert info.value.field == field and info.value.file == "bad.toml"


def test_unknown_and_missing_keys():
    raw = target_to_dict(get_target("rtx-ada"))
    with pytest.raises(BadInputError, match="unknown key 'kv'") as info:
        _decode(raw | {"kv": "paged"}, "bad.toml")
    assert info.value.field == "kv" and "attention" in info.value.fix  # the keys it takes are listed
    del raw["attention"]
    with pytest.raises(BadInputError, match="required key is missing") as info:
        _decode(raw, "bad.toml")
    assert info.value.field == "attention"
