"""The CPU arithmetic of benchmarks/bench_moe_kernels.py, each against an independent computation: its
quantiles against numpy's, its FLOP count against torch's FLOP counter over the float64 MoE reference, its
expert byte count against the tensors' own sizes, and the gate/up interleave it hands ORT against the one
`lower --for ort` writes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qwen3_compile.kernels import moe as kmoe
from qwen3_compile.lower.ort_moe import interleave_gate_up

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_moe_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_moe_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("n", [1, 2, 7, 60])
def test_summary_matches_numpy_percentiles(bench, n):
    values = np.random.default_rng(n).lognormal(3.0, 0.5, n).tolist()
    s = bench.summarize(values)
    assert s["n"] == n and s["min"] == min(values) and s["max"] == max(values)
    for key, q in (("p10", 10), ("median", 50), ("p90", 90)):
        assert s[key] == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_flops_match_torch_flop_counter_on_the_reference(bench):
    T, E, K, H, inter = 5, 8, 2, 64, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    gate_up = torch.randn(E, 2 * inter, H, generator=g)
    down = torch.randn(E, H, inter, generator=g)
    with FlopCounterMode(display=False) as counter:
        kmoe.moe_reference(x, logits, gate_up, down, K)
    assert counter.get_total_flops() == bench.moe_flops(T, K, H, inter)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_expert_bytes_match_the_tensors(bench, weights):
    E, H, inter = 3, 256, 128
    gate_up = torch.randn(E, 2 * inter, H).to(torch.bfloat16)
    down = torch.randn(E, H, inter).to(torch.bfloat16)
    if weights == "int4":
        gq, gs = kmoe.quantize_int4(gate_up, bench.INT4_GROUP, torch.float16)
        dq, ds = kmoe.quantize_int4(down, bench.INT4_GROUP, torch.float16)
        tensors = (gq[0], gs[0], dq[0], ds[0])
    elif weights == "int8":
        (gq, gs), (dq, ds) = kmoe.quantize_int8(gate_up), kmoe.quantize_int8(down)
        tensors = (gq[0], gs[0], dq[0], ds[0])
    else:
        tensors = (gate_up[0], down[0])
    assert bench.expert_bytes(weights, H, inter) == sum(t.nbytes for t in tensors)


def test_interleave_matches_the_ort_lowering(bench):
    gate_up = torch.randn(4, 2 * 6, 10)
    got = bench.interleave_gate_up_torch(gate_up)
    assert got.is_contiguous()
    assert np.array_equal(got.numpy(), interleave_gate_up(gate_up.numpy()))
