"""One Qwen3-30B-A3B MoE layer (H 2048, I 768, E 128, top-8) on the GPU: our qmoe kernels against
transformers' Qwen3MoeExperts and ONNX Runtime's com.microsoft::MoE, every contender timed the same way.

    PYTHONPATH=. python3 benchmarks/bench_moe_kernels.py --out DIR [--quick]
    PYTHONPATH=.:/root/ortsite python3 benchmarks/bench_moe_kernels.py --out DIR   # with onnxruntime-gpu
    python3 benchmarks/bench_moe_kernels.py --dry-run               # CPU only: the plan and a table self-test

Token counts T = 1, 4, 16 (decode) and 512, 2048 (prefill). Two comparisons, each with its own table:
- bf16 (activations, weights and router logits): qmoe with the default dispatch (`path="auto"`) and each
  path the wrapper exposes (`gemv`, `mma`, `mma_sync`, `wgmma`; the label names the kernel the library
  resolved), qmoe with INT8 weight-only experts, qmoe with INT4 weight-only experts (groups of 128, fp16
  scales) on the path AUTO takes (at decode the GEMV path, whose kernels for groups of 128 are the
  tensor-core decode kernels), on the CUDA-core GEMV kernels (`QMOE_I4_MMA=0`, set for that contender's
  whole measurement; decode T only), on the mma.sync kernel and on the wgmma kernel (every T; wgmma only on
  SM 9.0, elsewhere the row records the refusal), and
  transformers' `Qwen3MoeExperts` with
  its `eager`, `batched_mm` (decode only: at prefill it gathers a [T*k, 2I, H] weight copy, 100 GB at
  T=2048) and `grouped_mm` implementations, each preceded by Qwen3's router math (fp32 softmax, top-k,
  renormalise).
- fp16, where ONNX Runtime's CUDA MoE kernel needs it (it has no bf16 kernel): qmoe (auto), transformers
  `batched_mm` (decode) and `grouped_mm`, and ORT's `com.microsoft::MoE` as a one-node model (fp16 input,
  fp16 router logits, gate/up rows interleaved and SwiGLU attributes as `lower --for ort` writes them), run
  through IO binding on the same torch tensors. Skipped, with the reason printed, if onnxruntime (with the
  CUDA provider) does not import.

Every contender gets the same inputs: a few input sets (x [T, H], router logits [T, E]) that select
different experts, the same weights, outputs preallocated where the API allows.

How each number is measured (identical for every contender; all work runs on one torch stream, and ORT is
given that stream as its compute stream through the CUDA provider option `user_compute_stream`, with the
run option `disable_synchronize_execution_providers=1`, so torch CUDA events bracket its kernels too):

(a) single call from a cold L2, two readings per repetition:
    - "cold GPU": write+read a buffer of max(256 MB, 4x the device's L2 size) (`bitwise_not_`), then a
      ~300 us spin kernel (`torch.cuda._sleep`) so the host can enqueue the call before the GPU reaches it,
      then CUDA event, the call, CUDA event. The events are stream-ordered after the flush, so this is the
      GPU time of one call on a cold L2 that does not overlap any other call. If the host needs longer to
      enqueue the call than the flush + spin take (host-bound: transformers `eager`, ORT), the gap is part
      of the number; the row's "host enqueue" time says when that happened.
    - "cold wall": the same flush, `torch.cuda.synchronize`-equivalent (stream sync), then
      `time.perf_counter` around the call and a stream sync: what one call costs a caller end to end,
      launch and synchronisation included.
    Median and p10/p90 over the repetitions (min/max and every reading in results.json).
(b) "replay": several calls (one per input set, rotating, so each call finds other experts' weights in L2)
    captured in one CUDA graph, then the graph replayed back to back; CUDA events around each replay,
    divided by the number of calls. Successive calls overlap at their boundaries here (a kernel of call
    n+1 starts while call n drains), so replay is faster than (a): it is a throughput figure, labelled as
    such. A contender that cannot be captured (transformers `eager` synchronises on data-dependent shapes;
    ORT is not captured unless `--ort-graph`) runs the same calls eagerly back to back instead, labelled
    "eager b2b". The replay outputs are checked against the reference too (`replay rel. err` in the JSON).

Roofline denominators, measured five times through the run (start, between sections, end): copy bandwidth
(a 1 GiB -> 1 GiB device copy, bytes read + written, median of event-timed repetitions) and the bf16
torch.matmul rate on 8192^3 operands. All readings are reported; percentages use their medians.
- decode (T <= 16): % HBM = (bytes the call must move: the distinct selected experts' weights, mean over the
  input sets, + x, logits and the output) / median copy bandwidth / measured time. The router's own [E, H]
  weight (0.5 MB) is not counted: the benchmarked calls start from router logits and never read it
  (results.json records it as `router_weight_bytes`).
- prefill (T >= 512): % matmul = (6 * T * k * H * I FLOPs) / measured time / median matmul rate.

Output: a markdown report (printed and written to DIR/results.md) and DIR/results.json with every raw
reading, written again after every row so a crash keeps what was measured. One contender's failure records
an error row and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

H, INTER, E, K = 2048, 768, 128, 8
DECODE_T = (1, 4, 16)
PREFILL_T = (512, 2048)
QMOE_PATHS = ("gemv", "mma", "mma_sync", "wgmma")  # besides "auto" (the default dispatch)
BYTES = {"bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}
INT4_GROUP = 128  # the recipe's default group size; scales in fp16
SPIN_US = 1000  # GPU spin after the flush: the host's head start to enqueue a cold call


# --------------------------------------------------------------------------------------------------
# Pure arithmetic and rendering (no GPU; checked by tests/benchmarks/test_bench_moe_stats.py).


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method), q in [0, 1]."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict:
    """Median, p10, p90, min, max and count of a list of readings."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": quantile(values, 0.5),
        "p10": quantile(values, 0.1),
        "p90": quantile(values, 0.9),
        "min": min(values),
        "max": max(values),
    }


def expert_bytes(weights: str, hidden: int = H, inter: int = INTER) -> int:
    """Bytes of one expert's gate_up [2I, H] and down [H, I] weights (+ INT8's fp32 row scales, INT4's fp16
    scales a group of INT4_GROUP input channels)."""
    n = int(3 * hidden * inter * BYTES[weights])
    if weights == "int8":
        n += 4 * (2 * inter + hidden)
    if weights == "int4":
        n += 2 * 3 * hidden * inter // INT4_GROUP
    return n


def call_bytes(distinct_experts: float, tokens: int, weights: str, act_bytes: int = 2) -> float:
    """Bytes one call must move at least: the distinct selected experts' weights, x, logits, output."""
    return distinct_experts * expert_bytes(weights) + act_bytes * tokens * (2 * H + E)


def moe_flops(tokens: int, top_k: int = K, hidden: int = H, inter: int = INTER) -> int:
    """FLOPs of the expert GEMMs: per (token, expert) pair 2*H*2I (gate_up) + 2*I*H (down)."""
    return 6 * tokens * top_k * hidden * inter


def roofline_pct(tokens: int, us: float, nbytes: float, copy_bw: float, matmul_rate: float) -> float:
    """Decode: % of the copy-bandwidth floor for `nbytes`; prefill: % of the matmul rate."""
    if not us or not math.isfinite(us) or us <= 0:
        return math.nan
    seconds = us * 1e-6
    if tokens > max(DECODE_T):
        return 100 * moe_flops(tokens) / seconds / matmul_rate
    return 100 * (nbytes / copy_bw) / seconds


def _fmt_stat(s: dict | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['median']:.1f} ({s['p10']:.1f}-{s['p90']:.1f})"


def _fmt(x, spec: str = ".0f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def render(meta: dict, readings: list[dict], rows: list[dict]) -> str:
    """The markdown report: header, roofline readings, one table per comparison."""
    den = denominators(readings)
    out = [
        "## qmoe MoE layer benchmark",
        "",
        f"- command: `{meta.get('command', '')}`",
        f"- GPU: {meta.get('gpu', '?')} (L2 {meta.get('l2_mb', '?')} MB, "
        f"flush buffer {meta.get('flush_mb', '?')} MB)",
        f"- torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '?')}, transformers "
        f"{meta.get('transformers', '?')}, onnxruntime {meta.get('onnxruntime', '-')}",
        f"- date: {meta.get('date', '?')}; mode: {meta.get('mode', '?')}",
        "",
        "Roofline readings (copy: 1 GiB -> 1 GiB, bytes read + written; matmul: bf16 8192^3):",
        "",
        "| # | when | copy TB/s | bf16 matmul TFLOP/s |",
        "|---:|---|---:|---:|",
    ]
    for i, r in enumerate(readings):
        out.append(f"| {i + 1} | {r['when']} | {r['copy_bw'] / 1e12:.2f} | {r['matmul'] / 1e12:.0f} |")
    if readings:
        out += [
            "",
            f"Denominators (medians of the readings): copy {den['copy_bw'] / 1e12:.2f} TB/s "
            f"(spread {den['copy_min'] / 1e12:.2f}-{den['copy_max'] / 1e12:.2f}), matmul "
            f"{den['matmul'] / 1e12:.0f} TFLOP/s "
            f"(spread {den['matmul_min'] / 1e12:.0f}-{den['matmul_max'] / 1e12:.0f}).",
        ]
    for section in dict.fromkeys(r["section"] for r in rows):
        srows = [r for r in rows if r["section"] == section]
        out += [
            "",
            f"### {section}",
            "",
            "Times in us: median (p10-p90). cold GPU: one call after an L2 flush, CUDA events; cold wall: "
            "host clock around one call + stream sync; replay: per call, back to back (graph or eager b2b). "
            "% roofline: decode (T <= 16) % of the HBM copy floor for the bytes the call must move, prefill "
            "% of the bf16 matmul rate. x: fastest transformers row's cold GPU median / this row's. "
            "rel. err: vs a float64 evaluation of the same inputs and 16-bit weights (INT8/INT4 rows include "
            "the quantisation error). (host-bound): the host took longer to enqueue the call than the "
            "flush + spin head start, so the cold GPU time includes host gaps. floor rows: moving the bf16 "
            "call's bytes and nothing else, timed the same way: torch's read-only sum, torch's copy of half "
            "of them to the other half (its written half can stay in L2), and a plain read kernel "
            "(benchmarks/stream_probe.cu in its FLOOR_READ shape): the last is what a read-only single pass "
            "over those bytes costs on this GPU (also over the INT4 call's bytes). first n of 4 stages: "
            "the AUTO call cut after routing, gate_up or down (QMOE_STAGES), for the split by difference.",
            "",
            "| T | contender | cold GPU | cold wall | replay | replay mode | % roofline cold | "
            "% roofline replay | x vs transformers (cold GPU) | rel. err |",
            "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for T in sorted({r["T"] for r in srows}):
            trows = [r for r in srows if r["T"] == T]
            hf = [
                r["cold_gpu"]["median"]
                for r in trows
                if r["contender"].startswith("transformers") and r.get("cold_gpu", {}).get("n")
            ]
            best = min(hf) if hf else None
            for r in trows:
                if "error" in r or "skipped" in r:
                    what = "error: " + r["error"] if "error" in r else "skipped: " + r["skipped"]
                    out.append(f"| {T} | {r['contender']} | {what[:160]} | | | | | | | |")
                    continue
                cold = r["cold_gpu"]["median"]
                pc = roofline_pct(T, cold, r["bytes"], den["copy_bw"], den["matmul"])
                pr = roofline_pct(
                    T, r["replay"].get("median", math.nan), r["bytes"], den["copy_bw"], den["matmul"]
                )
                kind = "HBM" if T <= max(DECODE_T) else "mm"
                host = " (host-bound)" if r.get("host_bound") else ""
                speedup = best / cold if best and not (r.get("floor") or r.get("partial")) else None
                out.append(
                    f"| {T} | {r['contender']}{host} | {_fmt_stat(r['cold_gpu'])} | "
                    f"{_fmt_stat(r['cold_wall'])} | {_fmt_stat(r['replay'])} | {r['replay_mode']} | "
                    f"{_fmt(pc)} % {kind} | {_fmt(pr)} % {kind} | "
                    f"{_fmt(speedup, '.1f')} | "
                    f"{_fmt(r.get('rel_err'), '.1e')} |"
                )
        notes = [
            f"- T={r['T']} {r['contender']}: CUDA graph capture failed, replay ran eagerly back to back "
            f"({r['graph_capture_error']})"
            for r in srows
            if r.get("graph_capture_error")
        ]
        notes += [
            f"- T={r['T']} {r['contender']}: replay outputs differ from the reference "
            f"(rel. err {r['replay_rel_err']:.1e} vs {r['rel_err']:.1e} for the single call)"
            for r in srows
            if "replay_rel_err" in r and not r["replay_rel_err"] <= max(2 * r["rel_err"], 1e-2)
        ]
        if notes:
            out += ["", *notes]
    return "\n".join(out) + "\n"


def denominators(readings: list[dict]) -> dict:
    bw = [r["copy_bw"] for r in readings]
    mm = [r["matmul"] for r in readings]
    if not readings:
        return {"copy_bw": math.nan, "matmul": math.nan}
    return {
        "copy_bw": quantile(bw, 0.5),
        "copy_min": min(bw),
        "copy_max": max(bw),
        "matmul": quantile(mm, 0.5),
        "matmul_min": min(mm),
        "matmul_max": max(mm),
    }


# --------------------------------------------------------------------------------------------------
# GPU timing.


@dataclass
class Settings:
    cold_reps: int  # repetitions of a single cold call (upper bound)
    replays: int  # graph replays (upper bound)
    budget_s: float  # per contender and measurement kind: fewer repetitions for slow calls
    min_reps: int
    roof_reps: int
    graph_calls: dict = field(default_factory=lambda: {"decode": 8, "prefill": 4})


FULL = Settings(cold_reps=60, replays=20, budget_s=1.5, min_reps=5, roof_reps=10)
QUICK = Settings(cold_reps=15, replays=5, budget_s=0.3, min_reps=3, roof_reps=4)


class Timer:
    """Flush buffer, spin calibration and the two measurement kinds, all on one torch stream."""

    def __init__(self, torch, stream):
        self.torch, self.stream = torch, stream
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.l2 = int(getattr(props, "L2_cache_size", 0) or 60 << 20)
        self.flush_bytes = max(256 << 20, 4 * self.l2)
        self.flush_buf = torch.empty(self.flush_bytes, dtype=torch.uint8, device="cuda")
        self.flush_buf.zero_()
        self.sleep_cycles = 0
        self.sleep = getattr(torch.cuda, "_sleep", None)
        if self.sleep is not None:  # ~1 ms of spinning, calibrated (and capped should that misfire)
            self.sleep(1000)
            a, b = self.events()
            a.record()
            self.sleep(1_000_000)
            b.record()
            b.synchronize()
            per_us = 1_000_000 / max(a.elapsed_time(b) * 1e3, 1.0)
            self.sleep_cycles = min(int(SPIN_US * per_us), 4_000_000)
        a, b = self.events()
        a.record()
        self.pre_call()
        b.record()
        b.synchronize()
        self.head_start_us = a.elapsed_time(b) * 1e3  # flush + spin, GPU time

    def events(self):
        ev = self.torch.cuda.Event
        return ev(enable_timing=True), ev(enable_timing=True)

    def pre_call(self):
        self.flush_buf.bitwise_not_()
        if self.sleep is not None and self.sleep_cycles:
            self.sleep(self.sleep_cycles)

    def cold(self, calls, reps: int) -> dict:
        """Single calls from a cold L2: (GPU events after flush + spin, host wall after flush + sync)."""
        gpu, wall, enqueue = [], [], []
        for i in range(reps):
            call = calls[i % len(calls)]
            a, b = self.events()
            self.pre_call()
            a.record()
            t0 = time.perf_counter()
            call()
            enqueue.append((time.perf_counter() - t0) * 1e6)
            b.record()
            b.synchronize()
            gpu.append(a.elapsed_time(b) * 1e3)
            self.flush_buf.bitwise_not_()
            self.stream.synchronize()
            t0 = time.perf_counter()
            call()
            self.stream.synchronize()
            wall.append((time.perf_counter() - t0) * 1e6)
        return {"gpu": gpu, "wall": wall, "enqueue": enqueue}

    def replay(self, calls, replays: int, graph: bool):
        """Per-call microseconds of back-to-back calls: one CUDA graph of all `calls`, replayed (or, if
        `graph` is False or capture fails, the calls run eagerly back to back). Returns (mode, times,
        outputs of the calls, capture error or None)."""
        torch = self.torch
        outputs, mode, err, g = None, "eager b2b", None, None
        if graph:
            try:  # captured on the benchmark stream itself: ORT launches on it (user_compute_stream)
                self.stream.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=self.stream):
                    outputs = [c() for c in calls]
                # a call the graph did not capture would leave NaN here: the replay rel. err shows it
                # (the floor's read kernel returns nothing: it only reads)
                for o in outputs:
                    if o is not None:
                        o.fill_(math.nan)
                mode = "graph"
            except Exception as exc:  # capture refused: eager back to back, labelled
                err = f"{type(exc).__name__}: {exc}"[:300]
                g, outputs = None, None
                torch.cuda.synchronize()

        def run():
            if g is not None:
                g.replay()
                return outputs
            return [c() for c in calls]

        outputs = run()  # warm-up replay
        self.stream.synchronize()
        times = []
        for _ in range(replays):
            a, b = self.events()
            a.record()
            outs = run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / len(calls))
        return mode, times, outs, err


def roofline_reading(torch, bufs: dict, reps: int, when: str) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 8192^3 matmul rate, medians of event timings."""

    def timed(fn) -> list[float]:
        for _ in range(2):
            fn()
        ms = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        return ms

    src, dst = bufs["src"], bufs["dst"]
    copy_ms = timed(lambda: dst.copy_(src))
    A, B, C = bufs["A"], bufs["B"], bufs["C"]
    mm_ms = timed(lambda: torch.matmul(A, B, out=C))
    n = A.shape[0]
    r = {
        "when": when,
        "copy_bw": 2 * src.numel() / (quantile(copy_ms, 0.5) * 1e-3),
        "matmul": 2 * n**3 / (quantile(mm_ms, 0.5) * 1e-3),
        "copy_ms": copy_ms,
        "matmul_ms": mm_ms,
    }
    log(
        f"roofline reading '{when}': copy {r['copy_bw'] / 1e12:.2f} TB/s, "
        f"matmul {r['matmul'] / 1e12:.0f} TFLOP/s"
    )
    return r


# --------------------------------------------------------------------------------------------------
# Contenders: each a list of zero-argument calls (one per input set) that return the output tensor.


def qmoe_calls(kmoe, torch, xs, ls, weights, path):
    w1, w2, s1, s2 = weights
    outs = [torch.empty_like(x) for x in xs]
    prob = kmoe._problem(xs[0], ls[0], w1, K, True, s1, path)
    ws = torch.empty(max(kmoe.workspace_bytes(prob), 1), dtype=torch.uint8, device="cuda")
    return [
        (lambda x=x, lg=lg, o=o: kmoe.moe_forward(x, lg, w1, w2, K, True, s1, s2, path, o, ws))
        for x, lg, o in zip(xs, ls, outs, strict=True)
    ]


def transformers_calls(torch, xs, ls, gate_up, down, impl):
    """transformers' Qwen3MoeExperts (`impl`) after Qwen3's router math, as Qwen3MoeSparseMoeBlock runs it."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True
    )
    cfg._experts_implementation = impl
    with torch.device("meta"):
        ex = Qwen3MoeExperts(cfg)
    ex.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    ex.down_proj = torch.nn.Parameter(down, requires_grad=False)

    @torch.no_grad()
    def run(x, logits):
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(logits.dtype)
        return ex(x, ids, w)

    return [(lambda x=x, lg=lg: run(x, lg)) for x, lg in zip(xs, ls, strict=True)]


def interleave_gate_up_torch(gate_up):
    """[E, 2I, H] gate rows then up rows -> rows g0, u0, g1, u1, ... (lower/ort_moe.interleave_gate_up)."""
    experts, rows, hidden = gate_up.shape
    return (
        gate_up.view(experts, 2, rows // 2, hidden)
        .transpose(1, 2)
        .reshape(experts, rows, hidden)
        .contiguous()
    )


def ort_moe_model(weights_as_inputs: bool, fc1=None, fc2=None):
    """One com.microsoft::MoE node with the attributes `lower --for ort` writes (fp16)."""
    import onnx
    from onnx import TensorProto, helper

    from qwen3_compile.lower.ort_moe import ORT_DOMAIN, swiglu_moe_attributes

    f16 = TensorProto.FLOAT16
    inputs = [
        helper.make_tensor_value_info("input", f16, ["N", H]),
        helper.make_tensor_value_info("router_probs", f16, ["N", E]),
    ]
    inits = []
    if weights_as_inputs:
        inputs += [
            helper.make_tensor_value_info("fc1", f16, [E, 2 * INTER, H]),
            helper.make_tensor_value_info("fc2", f16, [E, H, INTER]),
        ]
    else:
        inits = [onnx.numpy_helper.from_array(fc1, "fc1"), onnx.numpy_helper.from_array(fc2, "fc2")]
    node = helper.make_node(
        "MoE",
        ["input", "router_probs", "fc1", "", "fc2"],
        ["output"],
        name="moe",
        domain=ORT_DOMAIN,
        **swiglu_moe_attributes({"top_k": K, "normalize": 1}),
    )
    graph = helper.make_graph(
        [node], "moe", inputs, [helper.make_tensor_value_info("output", f16, ["N", H])], initializer=inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ORT_DOMAIN, 1)]
    )
    model.ir_version = 10
    return model


class OrtMoE:
    """An ORT CUDA session of the one-node model on the benchmark's torch stream."""

    def __init__(self, torch, stream, gate_up16, down16, workdir: Path):
        import numpy as np
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider")
        self.ort, self.np, self.torch = ort, np, torch
        self.fc1 = interleave_gate_up_torch(gate_up16)
        self.fc2 = down16
        opts = {
            "device_id": str(torch.cuda.current_device()),
            "has_user_compute_stream": "1",
            "user_compute_stream": str(stream.cuda_stream),
            "use_tf32": "0",
        }
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.weights = "graph inputs (IO-bound to the torch weight tensors)"
        try:
            model = ort_moe_model(True)
            self.sess = ort.InferenceSession(
                model.SerializeToString(), so, providers=[("CUDAExecutionProvider", opts)]
            )
            self._probe()
        except Exception as exc:  # e.g. a kernel that wants its weights as initializers (prepacking)
            log(
                f"ORT with weights as graph inputs failed ({type(exc).__name__}: {exc}); "
                "retrying with the weights as initializers"
            )
            import onnx

            workdir.mkdir(parents=True, exist_ok=True)
            path = workdir / "ort_moe_fp16.onnx"
            model = ort_moe_model(False, self.fc1.cpu().numpy(), self.fc2.cpu().numpy())
            onnx.save(model, str(path), save_as_external_data=True, location="ort_moe_fp16.onnx.data")
            self.sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", opts)])
            self.weights = "initializers"
        self.providers = self.sess.get_providers()
        if self.providers[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"ORT session runs on {self.providers}, not CUDA")
        self.provider_options = self.sess.get_provider_options().get("CUDAExecutionProvider", {})
        self.version = ort.__version__

    def _bind(self, x, logits, out):
        np = self.np
        b = self.sess.io_binding()
        for name, t in (("input", x), ("router_probs", logits)):
            b.bind_input(name, "cuda", t.device.index or 0, np.float16, tuple(t.shape), t.data_ptr())
        if any(i.name == "fc1" for i in self.sess.get_inputs()):
            for name, t in (("fc1", self.fc1), ("fc2", self.fc2)):
                b.bind_input(name, "cuda", t.device.index or 0, np.float16, tuple(t.shape), t.data_ptr())
        b.bind_output("output", "cuda", out.device.index or 0, np.float16, tuple(out.shape), out.data_ptr())
        return b

    def _probe(self):
        x = self.torch.zeros(1, H, dtype=self.torch.float16, device="cuda")
        lg = self.torch.zeros(1, E, dtype=self.torch.float16, device="cuda")
        o = self.torch.empty_like(x)
        self.sess.run_with_iobinding(self._bind(x, lg, o), self.run_options)
        self.torch.cuda.current_stream().synchronize()

    def calls(self, xs, ls):
        outs = [self.torch.empty_like(x) for x in xs]
        binds = [self._bind(x, lg, o) for x, lg, o in zip(xs, ls, outs, strict=True)]
        sess, ro = self.sess, self.run_options
        return [
            (lambda b=b, o=o: (sess.run_with_iobinding(b, ro), o)[1])
            for b, o in zip(binds, outs, strict=True)
        ]


# --------------------------------------------------------------------------------------------------
# Driver.

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


@dataclass
class Contender:
    name: str
    weights: str  # "bf16", "fp16", "int8": for the byte count
    build: object  # () -> list of calls
    graph: bool = True  # try CUDA graph capture for the replay
    skip: str | None = None
    env: dict | None = None  # qmoe knobs (read at each launch) set for this contender's whole measurement
    path: str = ""  # qmoe rows: the path asked of qmoe_forward, resolved to a kernel name for the label
    floor: bool = False  # a practical floor (moves the call's bytes, computes no MoE): no rel. err
    partial: bool = False  # the first stages of a call only (QMOE_STAGES): no rel. err, no speed-up

    @property
    def whole_moe(self) -> bool:
        """Computes the whole MoE, so its output is checked against the reference."""
        return not (self.floor or self.partial)


def measure(
    timer: Timer, s: Settings, c: Contender, T: int, section: str, ref, distinct: float, info
) -> dict:
    torch = timer.torch
    row = {"section": section, "T": T, "contender": c.name, "weights": c.weights}
    if c.floor:
        row["floor"] = True
    if c.partial:
        row["partial"] = True
    if c.skip:
        row["skipped"] = c.skip
        log(f"{section} T={T} {c.name}: skipped ({c.skip})")
        return row
    saved = {k: os.environ.get(k) for k in c.env or {}}
    os.environ.update(c.env or {})
    try:
        calls = c.build()
        for _ in range(2):  # warm-up (allocations, cuBLAS handles, ORT arena)
            outs = [call() for call in calls]
        timer.stream.synchronize()
        row["rel_err"] = rel_err(torch, outs[0], ref) if c.whole_moe else None
        t0 = time.perf_counter()
        calls[0]()
        timer.stream.synchronize()
        one = time.perf_counter() - t0
        head = timer.head_start_us * 1e-6
        reps = max(s.min_reps, min(s.cold_reps, int(s.budget_s / (2 * (one + head) + 1e-4))))
        cold = timer.cold(calls, reps)
        replays = max(s.min_reps, min(s.replays, int(s.budget_s / (len(calls) * one + 1e-5))))
        mode, rep, routs, cap_err = timer.replay(calls, replays, c.graph)
        row.update(
            bytes=call_bytes(distinct, T, c.weights),
            distinct_experts=distinct,
            flops=moe_flops(T),
            cold_gpu=summarize(cold["gpu"]),
            cold_wall=summarize(cold["wall"]),
            host_enqueue=summarize(cold["enqueue"]),
            host_bound=quantile(cold["enqueue"], 0.5) > timer.head_start_us,
            replay=summarize(rep),
            replay_mode=mode,
            replay_calls_per_graph=len(calls),
            raw={
                "cold_gpu_us": cold["gpu"],
                "cold_wall_us": cold["wall"],
                "host_enqueue_us": cold["enqueue"],
                "replay_us": rep,
            },
        )
        if c.whole_moe:
            row["replay_rel_err"] = rel_err(torch, routs[0], ref)
        if cap_err:
            row["graph_capture_error"] = cap_err
        row.update(info(c) if info else {})
        log(
            f"{section} T={T} {c.name}: cold GPU {row['cold_gpu']['median']:.1f} us, cold wall "
            f"{row['cold_wall']['median']:.1f} us, replay {row['replay']['median']:.1f} us/call ({mode}), "
            f"rel err {_fmt(row['rel_err'], '.1e')}"
        )
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["traceback"] = traceback.format_exc()[-3000:]
        log(f"{section} T={T} {c.name}: FAILED {row['error']}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return row


def floor_kernel_row(weights: str = "bf16") -> str:
    return f"floor: read kernel over the {weights} call's bytes"


# QMOE_STAGES=n runs a call's first n stages: 1 routing, 2 + gate_up, 3 + down (4, the whole call, is the
# AUTO row). At T=1 the two single-token kernels route for themselves: 1 launches nothing, 2 is the gate_up
# kernel, 3 adds the down kernel with the combine.
STAGES = (1, 2, 3)


def stage_row(n: int, weights: str = "bf16") -> str:
    return f"qmoe {weights} auto, first {n} of 4 stages"


def load_floor_probe(torch) -> tuple[tuple | None, str | None]:
    """(stream_probe module, its library built for this GPU, SM count), or None and why not: the read-kernel
    floor row needs nvcc; without it the row is skipped with that reason."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stream_probe

    major, minor = torch.cuda.get_device_capability()
    try:
        # the loaded library outlives its file
        with tempfile.TemporaryDirectory(prefix="stream_probe_") as tmp:
            lib = stream_probe.load_probe(stream_probe.build_probe(f"{major}{minor}", Path(tmp)))
    except RuntimeError as exc:
        return None, f"read probe not built: {str(exc).splitlines()[0]}"
    return (stream_probe, lib, torch.cuda.get_device_properties(0).multi_processor_count), None


def floor_calls(torch, nbytes: float, n_sets: int, how: str, probe=None):
    """Calls that move a qmoe call's bytes and nothing else, one buffer per input set like the contenders:
    `read` sums them (a read-only pass), `copy` copies them (half the bytes read, half written), `kernel`
    reads them with stream_probe.cu's read kernel in its FLOOR_READ shape (`probe`: module, library, SMs)."""
    n = int(nbytes) // 2
    if how == "kernel":
        module, lib, sms = probe
        shape = module.FLOOR_READ
        size = int(nbytes) // 16 * 16
        bufs = [torch.empty(size, device="cuda", dtype=torch.uint8).random_() for _ in range(n_sets)]
        layout, blocks = module.LAYOUTS[shape["layout"]], shape["blocks_per_sm"] * sms
        sink = torch.zeros(blocks, device="cuda", dtype=torch.int32)

        def read(b) -> None:  # launched on the current stream, so a CUDA graph capture records it
            stream = torch.cuda.current_stream().cuda_stream
            module.checked(
                lib.probe_read(
                    b.data_ptr(),
                    size,
                    sink.data_ptr(),
                    layout,
                    shape["in_flight"],
                    blocks,
                    module.THREADS,
                    stream,
                )
            )

        return [lambda b=b: read(b) for b in bufs]
    if how == "read":
        bufs = [torch.randn(n, device="cuda").to(torch.bfloat16) for _ in range(n_sets)]
        return [lambda b=b: b.sum(dtype=torch.float32) for b in bufs]
    pairs = [
        (
            torch.randn(n // 2, device="cuda").to(torch.bfloat16),
            torch.empty(n // 2, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(n_sets)
    ]
    return [lambda s=src, d=dst: d.copy_(s) for src, dst in pairs]


def int4_experts(kmoe, torch, gate_up, down) -> tuple:
    """(gate_up, down, their scales) in the layout the INT4 recipes export: groups of 128, fp16 scales."""
    gq, gs = kmoe.quantize_int4(gate_up, INT4_GROUP, torch.float16)
    dq, ds = kmoe.quantize_int4(down, INT4_GROUP, torch.float16)
    return gq, dq, gs, ds


def rel_err(torch, out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def inputs(torch, T: int, n_sets: int, dtype):
    xs = [torch.randn(T, H, device="cuda").to(dtype) for _ in range(n_sets)]
    ls = [torch.randn(T, E, device="cuda").to(dtype) for _ in range(n_sets)]
    return xs, ls


def run_section(ctx, section: str, dtype_name: str, tokens) -> None:
    for T in tokens:
        run_tokens(ctx, section, dtype_name, T, tokens)
        ctx["torch"].cuda.empty_cache()


def run_tokens(ctx, section: str, dtype_name: str, T: int, tokens) -> None:
    """Every contender of one comparison at T tokens, on the same input sets."""
    torch, kmoe, timer, s = ctx["torch"], ctx["kmoe"], ctx["timer"], ctx["settings"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    gate_up, down = ctx["weights"][dtype_name]
    decode = T <= max(DECODE_T)
    n_sets = s.graph_calls["decode" if decode else "prefill"]
    xs, ls = inputs(torch, T, n_sets, dtype)
    # the sets route to different numbers of experts: the cold calls cycle through them, so their times
    # cycle too (the per-set counts are kept with each row for per-call byte counts)
    per_set = [len(torch.unique(kmoe.route_reference(lg, K, True)[0])) for lg in ls]
    distinct = sum(per_set) / n_sets
    ref = kmoe.moe_reference(xs[0], ls[0], gate_up, down, K, True)  # float64, the same 16-bit inputs
    contenders: list[Contender] = []
    if dtype_name == "bf16":
        for path in ("auto", *QMOE_PATHS):
            contenders.append(
                Contender(
                    f"qmoe bf16 {path}",
                    "bf16",
                    lambda p=path: qmoe_calls(kmoe, torch, xs, ls, (gate_up, down, None, None), p),
                    path=path,
                )
            )
        contenders.append(
            Contender(
                "qmoe int8 auto",
                "int8",
                lambda: qmoe_calls(kmoe, torch, xs, ls, ctx["int8"], "auto"),
                path="auto",
            )
        )
        for path in ("mma_sync", "wgmma"):
            contenders.append(
                Contender(
                    f"qmoe int4 {path}",
                    "int4",
                    lambda p=path: qmoe_calls(kmoe, torch, xs, ls, ctx["int4"], p),
                    path=path,
                )
            )
        contenders.append(
            Contender(
                "qmoe int4 auto",
                "int4",
                lambda: qmoe_calls(kmoe, torch, xs, ls, ctx["int4"], "auto"),
                path="auto",
            )
        )
        if decode:
            contenders.append(
                Contender(
                    "qmoe int4 cuda-core gemv",
                    "int4",
                    lambda: qmoe_calls(kmoe, torch, xs, ls, ctx["int4"], "gemv"),
                    env={"QMOE_I4_MMA": "0"},
                    path="gemv",
                )
            )
        if decode:  # what moving the bf16 call's bytes alone costs, timed the same way
            nbytes = call_bytes(distinct, T, "bf16")
            for how in ("read", "copy"):
                contenders.append(
                    Contender(
                        f"floor: torch {how} of the bf16 call's bytes",
                        "bf16",
                        lambda h=how: floor_calls(torch, nbytes, n_sets, h),
                        floor=True,
                    )
                )
            for weights in ("bf16", "int4"):
                contenders.append(
                    Contender(
                        floor_kernel_row(weights),
                        weights,
                        lambda w=weights: floor_calls(
                            torch, call_bytes(distinct, T, w), n_sets, "kernel", ctx["probe"]
                        ),
                        floor=True,
                        skip=ctx["probe_skip"],
                    )
                )
        if ctx.get("stages"):  # where a call's time goes, by difference of these rows
            # INT4 at decode too: its call is far from the read floor of its bytes
            weight_sets = {"bf16": (gate_up, down, None, None), **({"int4": ctx["int4"]} if decode else {})}
            for weights, tensors in weight_sets.items():
                for n in STAGES:
                    contenders.append(
                        Contender(
                            stage_row(n, weights),
                            weights,
                            lambda w=tensors: qmoe_calls(kmoe, torch, xs, ls, w, "auto"),
                            env={"QMOE_STAGES": str(n)},
                            path="auto",
                            partial=True,
                        )
                    )
        impls = ("eager", "batched_mm", "grouped_mm")
    else:
        contenders.append(
            Contender(
                "qmoe fp16 auto",
                "fp16",
                lambda: qmoe_calls(kmoe, torch, xs, ls, (gate_up, down, None, None), "auto"),
                path="auto",
            )
        )
        impls = ("batched_mm", "grouped_mm")
    for impl in impls:
        skip = None
        if impl == "batched_mm" and not decode:
            skip = "gathers a [T*k, 2I, H] weight copy (100 GB at T=2048)"
        contenders.append(
            Contender(
                f"transformers {impl} {dtype_name}",
                dtype_name,
                lambda i=impl: transformers_calls(torch, xs, ls, gate_up, down, i),
                graph=impl != "eager",
                skip=skip or ctx["transformers_skip"],
            )
        )
    if dtype_name == "fp16":
        ort = ctx.get("ort")
        contenders.append(
            Contender(
                "onnxruntime com.microsoft::MoE fp16",
                "fp16",
                lambda: ort.calls(xs, ls),
                graph=ctx["ort_graph"],
                skip=None if ort else ctx["ort_skip"],
            )
        )

    def info(c: Contender) -> dict:
        if c.path:
            w = ctx[c.weights] if c.weights in ("int8", "int4") else (gate_up, down, None, None)
            try:
                kernel = kmoe.resolve_path(xs[0], ls[0], w[0], K, w[2], c.path)
                # env knobs pick a variant inside the resolved path (e.g. the INT4 CUDA-core kernels)
                return {"kernel": ", ".join([kernel, *(f"{k}={v}" for k, v in (c.env or {}).items())])}
            except Exception as exc:
                return {"kernel": f"unresolved: {exc}"}
        if c.name.startswith("onnxruntime"):
            sync = None
            if T == max(tokens):  # does run_with_iobinding return before the GPU is done?
                timer.stream.synchronize()
                ctx["ort"].calls(xs[:1], ls[:1])[0]()
                sync = bool(timer.stream.query())
                timer.stream.synchronize()
            return {
                "ort_weights": ctx["ort"].weights,
                "ort_provider_options": ctx["ort"].provider_options,
                "ort_returned_after_gpu_finished": sync,
            }
        return {}

    only = ctx.get("only")
    for c in contenders:
        if only and not re.search(only, c.name):
            continue
        row = measure(timer, s, c, T, section, ref, distinct, info)
        row["distinct_per_set"] = per_set
        if "kernel" in row:
            row["contender"] += f" ({row['kernel']})"
        ctx["rows"].append(row)
        ctx["save"]()


def environment(torch, args, mode: str) -> dict:
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mode": mode,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except Exception as exc:
        meta["transformers"] = f"not importable ({type(exc).__name__})"
    return meta


def contender_names(section: str, T: int, stages: bool = False, only: str | None = None) -> list[str]:
    """The contenders a run measures for one section and T, in order (`only`: the --only filter)."""
    decode = T <= max(DECODE_T)
    if section == "bf16":
        names = [f"qmoe bf16 {p}" for p in ("auto", *QMOE_PATHS)]
        names += ["qmoe int8 auto", "qmoe int4 mma_sync", "qmoe int4 wgmma", "qmoe int4 auto"]
        if decode:
            names += ["qmoe int4 cuda-core gemv"]
            names += [f"floor: torch {h} of the bf16 call's bytes" for h in ("read", "copy")]
            names += [floor_kernel_row(w) for w in ("bf16", "int4")]
        if stages:
            names += [stage_row(n, w) for w in ("bf16", "int4") for n in STAGES if w == "bf16" or decode]
        impls = ("eager", "batched_mm", "grouped_mm")
    else:
        names = ["qmoe fp16 auto"]
        impls = ("batched_mm", "grouped_mm")
    names += [f"transformers {i} {section}" for i in impls if i != "batched_mm" or decode]
    if section == "fp16":
        names.append("onnxruntime com.microsoft::MoE fp16")
    return [n for n in names if not only or re.search(only, n)]


def plan(tokens, sections, stages: bool = False, only: str | None = None) -> list[str]:
    lines = []
    for sec in sections:
        lines += [f"{sec} T={T}: " + ", ".join(contender_names(sec, T, stages, only)) for T in tokens]
    return lines


def self_test() -> str:
    """CPU check of the statistics, roofline arithmetic and table rendering on synthetic readings."""
    vals = [float(v) for v in (5, 1, 4, 2, 3)]
    s = summarize(vals)
    assert (s["median"], s["min"], s["max"]) == (3.0, 1.0, 5.0), s
    assert abs(s["p10"] - 1.4) < 1e-12 and abs(s["p90"] - 4.6) < 1e-12, s
    readings = [
        {"when": w, "copy_bw": bw, "matmul": mm}
        for w, bw, mm in (("start", 4.2e12, 7.9e14), ("mid", 4.25e12, 7.0e14), ("end", 4.1e12, 7.5e14))
    ]
    den = denominators(readings)
    assert den["copy_bw"] == 4.2e12 and den["matmul"] == 7.5e14
    nbytes = call_bytes(8, 1, "bf16")
    assert abs(roofline_pct(1, 30.0, nbytes, 4.2e12, 7.5e14) - 100 * nbytes / 4.2e12 / 30e-6) < 1e-9
    stat = summarize([30.0, 31.0, 33.0])
    rows = [
        {
            "section": "bf16",
            "T": 1,
            "contender": "qmoe bf16 auto (gemv)",
            "weights": "bf16",
            "bytes": nbytes,
            "cold_gpu": stat,
            "cold_wall": summarize([60.0]),
            "replay": summarize([28.0]),
            "replay_mode": "graph",
            "rel_err": 2.9e-3,
        },
        {
            "section": "bf16",
            "T": 1,
            "contender": "transformers eager bf16",
            "weights": "bf16",
            "bytes": nbytes,
            "cold_gpu": summarize([3000.0]),
            "cold_wall": summarize([3100.0]),
            "replay": summarize([2900.0]),
            "replay_mode": "eager b2b",
            "host_bound": True,
            "rel_err": 5e-3,
        },
        {
            "section": "bf16",
            "T": 1,
            "contender": "floor: torch read of the bf16 call's bytes",
            "floor": True,
            "weights": "bf16",
            "bytes": nbytes,
            "cold_gpu": summarize([25.0]),
            "cold_wall": summarize([50.0]),
            "replay": summarize([20.0]),
            "replay_mode": "graph",
            "rel_err": None,
        },
        {"section": "bf16", "T": 2048, "contender": "transformers batched_mm bf16", "skipped": "too big"},
        {
            "section": "fp16",
            "T": 2048,
            "contender": "onnxruntime com.microsoft::MoE fp16",
            "error": "RuntimeError: x",
        },
    ]
    meta = {"command": "self-test", "gpu": "none", "date": "-", "mode": "self-test"}
    return render(meta, readings, rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=None, help="folder for results.md and results.json")
    ap.add_argument(
        "--quick", action="store_true", help="fewer repetitions (~1 minute after the library build)"
    )
    ap.add_argument(
        "--tokens", default=",".join(map(str, DECODE_T + PREFILL_T)), help="token counts, comma-separated"
    )
    ap.add_argument("--sections", default="bf16,fp16", help="comparisons to run: bf16, fp16")
    ap.add_argument("--ort-graph", action="store_true", help="try to capture ORT runs in the CUDA graph too")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: print the plan and a self-test table")
    ap.add_argument("--profile", type=int, default=0, help="only run N calls of --profile-tokens (for ncu)")
    ap.add_argument("--profile-tokens", type=int, default=1, help="tokens a call for --profile")
    ap.add_argument(
        "--profile-weights", choices=["bf16", "int4"], default="bf16", help="weights of the --profile calls"
    )
    ap.add_argument(
        "--stages",
        action="store_true",
        help="also time the AUTO call's first 1, 2, 3 stages (bf16; INT4 at decode)",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="measure only the contenders whose name matches this regular expression (A/B runs)",
    )
    args = ap.parse_args()
    if args.only:
        try:
            re.compile(args.only)
        except re.error as exc:
            ap.error(f"--only: not a regular expression: {exc}")
    tokens = tuple(int(t) for t in args.tokens.split(",") if t)
    sections = tuple(x for x in args.sections.split(",") if x)
    if bad := [x for x in sections if x not in ("bf16", "fp16")]:
        ap.error(f"unknown section(s) {bad}")
    settings = QUICK if args.quick else FULL

    if args.dry_run:
        print("\n".join(plan(tokens, sections, args.stages, args.only)))
        print(f"settings: {settings}")
        print(self_test())
        return

    import torch

    from qwen3_compile.kernels import moe as kmoe

    if not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run for the CPU self-test)")
    torch.manual_seed(0)
    t = time.time()
    kmoe.load_library()
    log(f"qmoe library built/loaded in {time.time() - t:.1f} s")

    gate_up = (torch.randn(E, 2 * INTER, H, device="cuda") / H**0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, INTER, device="cuda") / INTER**0.5).to(torch.bfloat16)
    if args.profile:
        gu, dn, gus, dns = (gate_up, down, None, None)
        if args.profile_weights == "int4":
            gu, dn, gus, dns = int4_experts(kmoe, torch, gate_up, down)
        for _ in range(args.profile):
            T = args.profile_tokens
            x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
            logits = torch.randn(T, E, device="cuda").to(torch.bfloat16)
            kmoe.moe_forward(x, logits, gu, dn, K, True, gus, dns)
        torch.cuda.synchronize()
        return

    mode = "quick" if args.quick else "full"
    meta = environment(torch, args, mode)
    meta["gpu"] = torch.cuda.get_device_name()
    stream = torch.cuda.Stream()
    rows: list[dict] = []
    readings: list[dict] = []
    results = {"meta": meta, "settings": settings.__dict__, "readings": readings, "rows": rows}

    def save() -> None:
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            results["denominators"] = denominators(readings)
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    with torch.cuda.stream(stream):
        timer = Timer(torch, stream)
        meta.update(
            l2_mb=round(timer.l2 / 2**20, 1),
            flush_mb=timer.flush_bytes >> 20,
            spin_cycles=timer.sleep_cycles,
            head_start_us=round(timer.head_start_us, 1),
            router_weight_bytes=E * H * 2,
        )
        log(
            f"{meta['gpu']}: L2 {meta['l2_mb']} MB, flush {meta['flush_mb']} MB, "
            f"flush + spin {timer.head_start_us:.0f} us"
        )
        n = 8192
        bufs = {
            "src": torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda"),
            "dst": torch.empty(1 << 30, dtype=torch.uint8, device="cuda"),
            "A": torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
            "B": torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
            "C": torch.empty(n, n, device="cuda", dtype=torch.bfloat16),
        }
        readings.append(roofline_reading(torch, bufs, settings.roof_reps, "start"))

        weights = {"bf16": (gate_up, down)}
        ctx = {
            "torch": torch,
            "kmoe": kmoe,
            "timer": timer,
            "settings": settings,
            "rows": rows,
            "save": save,
            "weights": weights,
            "ort_graph": args.ort_graph,
            "transformers_skip": None,
            "stages": args.stages,
            "only": args.only,
        }
        ctx["probe"], ctx["probe_skip"] = load_floor_probe(torch)
        if ctx["probe_skip"]:
            log(ctx["probe_skip"])
        gq, gs = kmoe.quantize_int8(gate_up)
        dq, ds = kmoe.quantize_int8(down)
        ctx["int8"] = (gq, dq, gs, ds)
        ctx["int4"] = int4_experts(kmoe, torch, gate_up, down)
        try:
            import transformers  # noqa: F401
        except Exception as exc:
            ctx["transformers_skip"] = f"transformers not importable: {type(exc).__name__}: {exc}"
            log(ctx["transformers_skip"])
        if "fp16" in sections:
            weights["fp16"] = (gate_up.to(torch.float16), down.to(torch.float16))
            try:
                # a fallback model with initializers (1.2 GB) goes to a temporary folder, never to --out
                ctx["ort"] = OrtMoE(
                    torch, stream, *weights["fp16"], Path(tempfile.mkdtemp(prefix="ort_moe_"))
                )
                meta["onnxruntime"] = ctx["ort"].version
                meta["ort_weights"] = ctx["ort"].weights
                log(f"onnxruntime {ctx['ort'].version}: CUDA session ready, weights as {ctx['ort'].weights}")
            except Exception as exc:
                ctx["ort"] = None
                ctx["ort_skip"] = f"onnxruntime unavailable: {type(exc).__name__}: {exc}"[:300]
                meta["onnxruntime"] = ctx["ort_skip"]
                log(ctx["ort_skip"])
        save()

        decode = [T for T in tokens if T <= max(DECODE_T)]
        prefill = [T for T in tokens if T > max(DECODE_T)]
        steps = [(sec, part) for sec in sections for part in (decode, prefill) if part]
        # five roofline readings: start, between sections, end (fewer sections: still five)
        between = max(1, len(steps) - 1)
        extra = 5 - 1 - between - 1  # readings left over after start, one per boundary, end
        for i, (sec, part) in enumerate(steps):
            log(f"section {sec} T={part}")
            run_section(ctx, sec, sec, part)
            if i < len(steps) - 1:
                readings.append(roofline_reading(torch, bufs, settings.roof_reps, f"after {sec} T={part}"))
            save()
        for j in range(max(0, extra)):
            readings.append(roofline_reading(torch, bufs, settings.roof_reps, f"end ({j + 1})"))
        readings.append(roofline_reading(torch, bufs, settings.roof_reps, "end"))
        save()

    report = render(meta, readings, rows)
    print(report)
    if args.out:
        (args.out / "results.md").write_text(report)
        log(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
