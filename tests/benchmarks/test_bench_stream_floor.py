"""bench_stream_floor.py off the GPU: the probes compile without spills; the report ranks the read probes."""

from __future__ import annotations

import random
import re
import sys

import pytest

from qwen3_compile.kernels.build import find_nvcc
from tests.benchmarks.benchmark_scripts import loaded_script


@pytest.fixture(scope="module")
def floor():
    with loaded_script("bench_stream_floor", on_path=True) as module:  # it imports its siblings
        yield module


@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc")
def test_probes_compile_for_hopper_without_spills(floor, tmp_path):
    lib = floor.build_probe("90", tmp_path)
    assert lib.stat().st_size > 0
    log = (tmp_path / "ptxas.txt").read_text()
    kernels = log.count("Compiling entry function")
    # every layout x loads-a-thread read kernel and both copy kernels
    assert kernels == len(floor.LAYOUTS) * len(floor.IN_FLIGHT) + 2, log
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert len(spills) == 2 * kernels and not any(spills), log


def test_report_shows_the_fastest_and_slowest_read_probe(floor):
    rng = random.Random()
    rows = []
    for mb in (25, 75):
        times = {f"probe read, cfg {i}": rng.uniform(20, 90) for i in range(12)}
        times["torch sum (read)"] = rng.uniform(20, 90)
        for name, t in times.items():
            stat = {"median": t, "p10": t - 1, "p90": t + 1}
            rows.append({"MB": mb, "bytes": mb * 10**6, "contender": name, "cold_gpu_us": stat})
    text = floor.render({"command": "x", "gpu": "g", "sms": 1, "l2_mb": 1, "torch": "t", "date": "d"}, rows)
    for mb in (25, 75):
        probes = {
            r["contender"]: r["cold_gpu_us"]["median"]
            for r in rows
            if r["MB"] == mb and "probe" in r["contender"]
        }
        best = min(probes, key=probes.get)
        worst = max(probes, key=probes.get)
        assert f"| {mb} | best {best} | {probes[best]:.1f} " in text
        assert f"| {mb} | worst {worst} | {probes[worst]:.1f} " in text
        tb = mb * 10**6 / probes[best] / 1e6
        assert f"| {tb:.2f} |" in text
    assert text.count("torch sum (read)") == 2


def test_moe_benchmark_floor_shape_is_one_the_floor_bench_measures(floor):
    """bench_moe_kernels' read-floor row runs the probe in stream_probe.FLOOR_READ; that shape must be one of
    bench_stream_floor's grid, so its plateau claim can be checked against the floor report."""
    shape = sys.modules["stream_probe"].FLOOR_READ
    assert shape["layout"] in floor.LAYOUTS
    assert shape["in_flight"] in floor.IN_FLIGHT
    assert shape["blocks_per_sm"] in floor.BLOCKS_PER_SM
