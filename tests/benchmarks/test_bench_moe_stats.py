"""The CPU arithmetic of benchmarks/bench_moe_kernels.py, each against an independent computation: its
quantiles against numpy's, its FLOP count against torch's FLOP counter over the float64 MoE reference, its
expert byte count against the tensors' own sizes, and the gate/up interleave it hands ORT against the one
`lower --for ort` writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qwen3_compile.kernels import moe as kmoe
from qwen3_compile.lower.ort_moe import interleave_gate_up
from tests.benchmarks.benchmark_scripts import loaded_script


@pytest.fixture(scope="module")
def bench():
    with loaded_script("bench_moe_kernels") as module:
        yield module


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


def test_report_gives_floor_and_partial_rows_no_speed_up_or_error(bench):
    """A floor row (moves bytes, computes nothing) and a partial call (QMOE_STAGES) are timed like contenders
    but have no output to check and are no faster implementation: their x and rel. err cells stay empty,
    while a full qmoe row's x is the transformers row's median over its own."""
    stat = bench.summarize
    base = {"section": "bf16", "T": 4, "weights": "bf16", "bytes": 3e8, "replay_mode": "graph"}

    def row(name, cold, **extra):
        return dict(
            base, contender=name, cold_gpu=stat([cold]), cold_wall=stat([cold]), replay=stat([cold]), **extra
        )

    rows = [
        row("transformers grouped_mm bf16", 240.0, rel_err=4e-3),
        row("qmoe bf16 auto (gemv)", 96.0, rel_err=3e-3),
        row(bench.floor_kernel_row(), 80.0, floor=True, rel_err=None),
        row(bench.stage_row(2), 60.0, partial=True, rel_err=None),
    ]
    readings = [{"when": "start", "copy_bw": 4.2e12, "matmul": 7.5e14}]
    table = bench.render({"command": "test"}, readings, rows)
    cells = {
        line.split("|")[2].strip(): line.split("|")[-3:-1] for line in table.splitlines() if "| 4 |" in line
    }
    assert [c.strip() for c in cells["qmoe bf16 auto (gemv)"]] == [f"{240 / 96:.1f}", "3.0e-03"]
    for name in (bench.floor_kernel_row(), bench.stage_row(2)):
        assert [c.strip() for c in cells[name]] == ["-", "-"], (name, cells[name])


def test_only_filter_keeps_exactly_the_matching_contenders(bench):
    for section, T in (("bf16", 1), ("bf16", 2048), ("fp16", 4)):
        every = bench.contender_names(section, T, stages=True)
        kept = bench.contender_names(section, T, stages=True, only=r"int4 auto|MoE")
        assert kept == [n for n in every if "int4 auto" in n or "MoE" in n]
    # decode has the INT4 stage rows, prefill only the whole call; fp16 has ORT's MoE and no INT4
    assert len(bench.contender_names("bf16", 1, True, r"int4 auto")) == 1 + len(bench.STAGES)
    assert bench.contender_names("bf16", 2048, True, r"int4 auto") == ["qmoe int4 auto"]
    assert bench.contender_names("fp16", 4, True, r"int4 auto|MoE") == ["onnxruntime com.microsoft::MoE fp16"]


def test_only_refuses_a_bad_regular_expression():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_moe_kernels.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--only", "int4("], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--only: not a regular expression" in proc.stderr
