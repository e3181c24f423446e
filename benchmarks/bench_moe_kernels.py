"""Benchmark the qmoe CUDA kernels on one Qwen3-30B-A3B MoE layer (H 2048, I 768, E 128, top-8).

Measured in the same run: device copy bandwidth (bytes read + written), the bf16 torch.matmul rate on
random 8192^3 operands, and transformers' own MoE expert implementations on the same inputs.
Decode (T = 1, 4, 16) is reported against the HBM roofline (bytes of the distinct selected experts'
weights / copy bandwidth); prefill (T = 512, 2048) as TFLOP/s against the matmul rate.

    PYTHONPATH=. python3 benchmarks/bench_moe_kernels.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from qwen3_compile.kernels import moe as kmoe

H, INTER, E, K = 2048, 768, 128, 8
DECODE_T = (1, 4, 16)
PREFILL_T = (512, 2048)


def time_events(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over reps, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_graph(calls, reps: int) -> float:
    """Milliseconds per call: capture the calls (one per input set) in a CUDA graph, time the replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    ms = time_events(g.replay, reps)
    return ms / len(calls)


def forward_calls(xs, ls, outs, ws, weights):
    """One qmoe forward per input set, as closures (for graph capture)."""
    w1, w2, s1, s2 = weights
    return [
        (lambda x=x, lg=lg, o=o: kmoe.moe_forward(x, lg, w1, w2, K, True, s1, s2, "auto", o, ws))
        for x, lg, o in zip(xs, ls, outs, strict=True)
    ]


def copy_bandwidth() -> float:
    n = 2 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_events(lambda: b.copy_(a), 20)
    return 2 * n / (ms * 1e-3)


def small_stream_times(nbytes: int, reps: int) -> dict[str, float]:
    """Microseconds per call, in a CUDA graph over 8 rotating buffers (cold in L2), of torch moving `nbytes`:
    a copy (nbytes/2 read + nbytes/2 written) and a read-only bf16 sum. The floor at a layer's size, where
    launch and ramp-up weigh more than in the 2 GB copy that sets the roofline."""
    half = nbytes // 2
    src = [torch.randint(0, 255, (half,), dtype=torch.uint8, device="cuda") for _ in range(8)]
    dst = [torch.empty_like(t) for t in src]
    vals = [torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16) for _ in range(8)]
    acc = torch.empty(8, device="cuda")
    copy = [(lambda a=a, b=b: b.copy_(a)) for a, b in zip(src, dst, strict=True)]
    read = [
        (lambda v=v, i=i: torch.sum(v, dim=0, dtype=torch.float32, out=acc[i])) for i, v in enumerate(vals)
    ]
    return {"copy": time_graph(copy, reps) * 1e3, "read": time_graph(read, reps) * 1e3}


def matmul_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_events(lambda: a @ b, 20)
    return 2 * n**3 / (ms * 1e-3)


def torch_loop_moe(x, logits, gate_up, down, k):
    """Naive reference: router in torch, then a Python loop over the experts that received tokens."""
    probs = torch.softmax(logits.float(), -1)
    w, ids = torch.topk(probs, k, -1)
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        g, u = torch.nn.functional.linear(x[tok], gate_up[e]).chunk(2, -1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down[e]) * w[tok, slot, None]
        out.index_add_(0, tok, y)
    return out


def transformers_block(gate_up, down, impl):
    """transformers' Qwen3MoeExperts with `impl` ('eager', 'batched_mm', 'grouped_mm') + its router math."""
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

    def run(x, logits):
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        return ex(x, ids, w)

    return run


def bench_tokens(T: int, weights: dict, bw: float, mm: float, reps: int) -> list[dict]:
    """All variants at T tokens; returns one row per variant."""
    gate_up, down = weights["bf16"][:2]
    expert_bytes = {"bf16": 2 * 3 * H * INTER, "int8": 3 * H * INTER + 4 * (2 * INTER + H)}
    decode = T in DECODE_T
    n_sets = 8 if decode else 2  # rotate inputs so successive calls pick different experts
    xs = [torch.randn(T, H, device="cuda").to(torch.bfloat16) for _ in range(n_sets)]
    # Router logits in bf16, as Qwen3's router Linear returns them.
    ls = [torch.randn(T, E, device="cuda").to(torch.bfloat16) for _ in range(n_sets)]
    distinct = statistics.mean(len(torch.unique(kmoe.route_reference(lg, K, True)[0])) for lg in ls)
    flops = 6 * T * K * H * INTER
    ref = torch_loop_moe(xs[0].float(), ls[0], gate_up.float(), down.float(), K)
    rows = []

    def add(variant, ms, wbytes, out):
        row = {"T": T, "variant": variant, "us": ms * 1e3, "tflops": flops / (ms * 1e-3) / 1e12}
        row["pct_matmul"] = 100 * flops / (ms * 1e-3) / mm
        row["weight_MB"] = wbytes / 1e6
        row["pct_hbm_roofline"] = 100 * (wbytes / bw) / (ms * 1e-3)
        row["rel_err_vs_fp32"] = ((out.float() - ref).norm() / ref.norm()).item()
        rows.append(row)
        print(json.dumps(row), flush=True)

    for kind, (w1, w2, s1, s2) in weights.items():
        outs = [torch.empty_like(x) for x in xs]
        prob = kmoe._problem(xs[0], ls[0], w1, K, True, s1, "auto")
        ws = torch.empty(kmoe.workspace_bytes(prob), dtype=torch.uint8, device="cuda")
        calls = forward_calls(xs, ls, outs, ws, (w1, w2, s1, s2))
        ms = time_graph(calls, reps)
        calls[0]()
        path = kmoe.resolve_path(xs[0], ls[0], w1, K, s1)
        add(f"qmoe {kind} ({path})", ms, distinct * expert_bytes[kind], outs[0])
        other = {"wgmma": "mma_sync", "mma_sync": "wgmma"}.get(path)
        if other and s1 is None and torch.cuda.get_device_capability() == (9, 0):
            # The other tensor-core kernel on the same inputs, same run (QMOE_WGMMA overrides the rule).
            os.environ["QMOE_WGMMA"] = "1" if other == "wgmma" else "0"
            try:
                ms = time_graph(calls, reps)
                calls[0]()
            finally:
                os.environ.pop("QMOE_WGMMA")
            add(f"qmoe {kind} ({other})", ms, distinct * expert_bytes[kind], outs[0])

    def naive():
        return torch_loop_moe(xs[0], ls[0], gate_up, down, K)

    add("torch loop (naive)", time_events(naive, max(3, reps // 3)), distinct * expert_bytes["bf16"], naive())
    for impl in ("eager", "batched_mm", "grouped_mm"):
        if impl == "batched_mm" and not decode:
            continue  # gathers a [T*k, 2I, H] weight copy: 100 GB at T=2048
        try:
            blk = transformers_block(gate_up, down, impl)
            ms = time_events(lambda blk=blk: blk(xs[0], ls[0]), max(3, reps // 3))
            add(f"transformers {impl}", ms, distinct * expert_bytes["bf16"], blk(xs[0], ls[0]))
        except Exception as exc:  # report, keep benchmarking
            print(f"transformers {impl} failed at T={T}: {type(exc).__name__}: {exc}", flush=True)
    return rows


VARIANTS = {  # environment knobs of the library (read at each call), for A/B timings in one run
    "default": {},
    "no PDL": {"QMOE_PDL": "0"},
    "mma.sync (QMOE_WGMMA=0)": {"QMOE_WGMMA": "0"},
    "wgmma (QMOE_WGMMA=1)": {"QMOE_WGMMA": "1"},
    **{f"wgmma, {n}-token tiles": {"QMOE_WGMMA": "1", "QMOE_WG_TILE": str(n)} for n in (64, 128, 192, 256)},
    "wgmma, 128 weight rows a block (QMOE_WG_ROWS=128)": {"QMOE_WGMMA": "1", "QMOE_WG_ROWS": "128"},
    **{
        f"wgmma, {n}-token tiles, 128 weight rows": {
            "QMOE_WGMMA": "1",
            "QMOE_WG_TILE": str(n),
            "QMOE_WG_ROWS": "128",
        }
        for n in (64, 192)
    },
    "single-block dispatch (QMOE_DISPATCH=1)": {"QMOE_DISPATCH": "1"},
    "stages: routing only, single-block dispatch": {"QMOE_STAGES": "1", "QMOE_DISPATCH": "1"},
    "grid-wide dispatch (QMOE_FUSED_ROUTER_MAX=0)": {"QMOE_FUSED_ROUTER_MAX": "0"},
    "stages: routing only, grid-wide dispatch": {"QMOE_STAGES": "1", "QMOE_FUSED_ROUTER_MAX": "0"},
    "stages: routing only": {"QMOE_STAGES": "1"},
    "stages: + gate_up": {"QMOE_STAGES": "2"},
    "stages: + down": {"QMOE_STAGES": "3"},
    "general path (no single-token kernels)": {"QMOE_TOKEN1": "0"},
    "single-token, down in two waves (1 row group a block)": {"QMOE_T1_DOWN_GROUPS": "1"},
}
# Variants that change nothing at some sizes are skipped there.
VARIANT_TOKENS = {name: (1,) for name in VARIANTS if name.startswith(("general path", "single-token"))}
VARIANT_TOKENS.update({name: (512, 2048) for name in VARIANTS if "wgmma" in name or "single-block" in name})
VARIANT_TOKENS.update({name: (16,) for name in VARIANTS if "grid-wide" in name})


def bench_variants(weights: dict, reps: int) -> list[dict]:
    """qmoe bf16 under each variant knob, plus a per-kernel time breakdown from the profiler."""

    gate_up, down = weights["bf16"][:2]
    rows = []
    one_expert = 2 * 3 * H * INTER
    for label, nbytes in (("8 experts (T=1)", K * one_expert),):
        t = small_stream_times(nbytes, reps)
        for kind, us in t.items():
            rows.append({"T": 1, "variant": f"torch {kind} of {nbytes / 1e6:.0f} MB, {label}", "us": us})
            print(json.dumps(rows[-1]), flush=True)
    for T in (1, 16, 512, 2048):
        n_sets = 8 if T <= 16 else 2
        xs = [torch.randn(T, H, device="cuda").to(torch.bfloat16) for _ in range(n_sets)]
        ls = [torch.randn(T, E, device="cuda").to(torch.bfloat16) for _ in range(n_sets)]
        outs = [torch.empty_like(x) for x in xs]
        prob = kmoe._problem(xs[0], ls[0], gate_up, K, True, None, "auto")
        ws = torch.empty(kmoe.workspace_bytes(prob), dtype=torch.uint8, device="cuda")
        calls = forward_calls(xs, ls, outs, ws, (gate_up, down, None, None))
        for name, env in VARIANTS.items():
            if T not in VARIANT_TOKENS.get(name, (T,)):
                continue
            os.environ.update(env)
            try:
                for _ in range(2):  # twice: the spread between repeats is the noise floor
                    rows.append({"T": T, "variant": name, "us": time_graph(calls, reps) * 1e3})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                for key in env:
                    os.environ.pop(key)
        router = [(lambda lg=lg: kmoe.moe_route(lg, K, True)) for lg in ls]
        rows.append({"T": T, "variant": "router kernel alone", "us": time_graph(router, reps) * 1e3})
        print(json.dumps(rows[-1]), flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                for c in calls:
                    c()
            torch.cuda.synchronize()
        n = 5 * n_sets
        for ev in prof.key_averages():
            if ev.device_type == torch.autograd.DeviceType.CUDA and "qmoe" in ev.key:
                us = ev.device_time_total / n
                print(f"T={T} kernel {ev.key[:90]}: {us:.1f} us/call", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--variants", action="store_true", help="A/B the library's variant knobs")
    ap.add_argument("--only-variants", action="store_true", help="skip the main table")
    ap.add_argument("--profile", type=int, default=0, help="only run N calls of --profile-tokens (under ncu)")
    ap.add_argument("--profile-tokens", type=int, default=1, help="tokens a call for --profile")
    args = ap.parse_args()
    reps = 10 if args.quick else 30
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    t0 = time.time()
    kmoe.load_library()
    print(f"# {dev}; library built/loaded in {time.time() - t0:.1f}s", flush=True)

    bw = copy_bandwidth()
    mm = matmul_rate()
    print(
        f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write); bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True
    )

    gate_up = (torch.randn(E, 2 * INTER, H, device="cuda") / H**0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, INTER, device="cuda") / INTER**0.5).to(torch.bfloat16)
    gq, gs = kmoe.quantize_int8(gate_up)
    dq, ds = kmoe.quantize_int8(down)

    weights = {"bf16": (gate_up, down, None, None), "int8": (gq, dq, gs, ds)}
    if args.profile:
        T = args.profile_tokens
        for _ in range(args.profile):
            x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
            kmoe.moe_forward(x, torch.randn(T, E, device="cuda").to(torch.bfloat16), gate_up, down, K, True)
        torch.cuda.synchronize()
        return
    rows = []
    for T in () if args.only_variants else DECODE_T + PREFILL_T:
        rows += bench_tokens(T, weights, bw, mm, reps)

    variants = bench_variants(weights, reps) if args.variants or args.only_variants else []
    table = render(rows, bw, mm, dev)
    if variants:
        table += "\n| T | variant | time (us), two repeats |\n|---:|---|---|\n"
        for T in sorted({r["T"] for r in variants}):
            extra = sorted({r["variant"] for r in variants if r["variant"].startswith("torch ")})
            for name in [*extra, *VARIANTS, "router kernel alone"]:
                ts = [f"{r['us']:.1f}" for r in variants if r["T"] == T and r["variant"] == name]
                if ts:
                    table += f"| {T} | {name} | {' / '.join(ts)} |\n"
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_moe.md").write_text(table)
        (args.out / "bench_moe.json").write_text(json.dumps({"bw": bw, "matmul": mm, "rows": rows}, indent=1))


def render(rows, bw, mm, dev) -> str:
    lines = [
        f"{dev}: copy {bw / 1e12:.2f} TB/s (read+write), bf16 torch.matmul {mm / 1e12:.0f} TFLOP/s (8192^3)",
        "",
        "| T | variant | time (us) | selected weights (MB) | % HBM roofline | TFLOP/s | % bf16 matmul | "
        "x vs best transformers | rel. err vs fp32 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for T in sorted({r["T"] for r in rows}):
        rs = [r for r in rows if r["T"] == T]
        hf = [r["us"] for r in rs if r["variant"].startswith("transformers")]
        best = min(hf) if hf else None
        for r in rs:
            speed = f"{best / r['us']:.1f}" if best else "-"
            lines.append(
                f"| {T} | {r['variant']} | {r['us']:.1f} | {r.get('weight_MB', 0):.0f} | "
                f"{r.get('pct_hbm_roofline', 0):.0f} | {r['tflops']:.1f} | {r['pct_matmul']:.0f} | {speed} | "
                f"{r.get('rel_err_vs_fp32', float('nan')):.1e} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
