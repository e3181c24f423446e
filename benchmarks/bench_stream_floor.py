"""What one kernel pass over a decode call's bytes costs on this GPU: the floor under the MoE kernels.

    PYTHONPATH=. python3 benchmarks/bench_stream_floor.py --out DIR   # on a CUDA GPU, ~1 minute
    python3 benchmarks/bench_stream_floor.py --dry-run                # CPU: compile the probes, the plan

The roofline in bench_moe_kernels.py divides a call's bytes by the copy bandwidth of a 1 GiB copy. A decode
call moves far less (75 MB at T=1 on the Qwen3-30B-A3B layer), so launch, ramp-up and tail weigh more. This
script times, for buffers of 25 MB to 1 GiB, single passes from a cold L2 with the same Timer as
bench_moe_kernels.py (L2 flushed by a 256 MB+ write, a calibrated GPU spin so the launch is not on the clock,
CUDA events around the call alone; median and p10-p90): our read probes (`stream_probe.cu`: 16-byte
non-coherent loads, grid-strided or in warp-contiguous chunks like a GEMV warp's rows, a range of loads a
thread and blocks an SM), our copy probe, and torch's `sum` and `copy_` of the same bytes. The best read probe
at 75 MB is the floor a single-pass MoE kernel could reach. The deeper read kernels take more registers (80 at
16 loads a thread: 3 blocks an SM), so grids of more blocks than fit run in waves; ptxas.txt has each
kernel's registers.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import sys
import tempfile
from pathlib import Path

from bench_moe_kernels import Timer, summarize
from stream_probe import LAYOUTS, THREADS, build_probe, checked, load_probe

SIZES_MB = (25, 50, 75, 150, 300, 1024)
IN_FLIGHT = (2, 4, 8, 16)
BLOCKS_PER_SM = (1, 2, 4, 8)
REPS = 25


def passes(torch, lib, src, dst, sink: int, sms: int, stream) -> dict:
    """Name -> zero-argument call, each one pass over `src` (copies: its first half into `dst`)."""
    sp, dp, nbytes, half = src.data_ptr(), dst.data_ptr(), src.numel(), dst.numel()

    calls = {
        "torch sum (read)": lambda: src.view(torch.bfloat16).sum(dtype=torch.float32),
        "torch copy_ (half read, half written)": lambda: dst.copy_(src[:half]),
    }
    for depth in (4, 8):
        calls[f"probe copy, {depth} loads a thread"] = lambda d=depth: checked(
            lib.probe_copy(sp, dp, half, d, 4 * sms, THREADS, stream)
        )
    for lname, layout in LAYOUTS.items():
        for depth in IN_FLIGHT:
            for per_sm in BLOCKS_PER_SM:
                calls[f"probe read, {lname}, {depth} loads a thread, {per_sm} blocks an SM"] = (
                    lambda lay=layout, d=depth, b=per_sm: checked(
                        lib.probe_read(sp, nbytes, sink, lay, d, b * sms, THREADS, stream)
                    )
                )
    return calls


def plan() -> list[str]:
    reads = len(LAYOUTS) * len(IN_FLIGHT) * len(BLOCKS_PER_SM)
    return [
        f"sizes (MB): {', '.join(map(str, SIZES_MB))}",
        f"per size: {reads} read-probe configurations (layout x loads a thread x blocks an SM, {THREADS} "
        f"threads a block), copy probe (4 and 8 loads a thread, 4 blocks an SM), torch sum, torch copy_",
        f"each: {REPS} single cold calls (Timer.cold), median and p10-p90",
    ]


def run(out: Path | None) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run for the CPU check)")
    major, minor = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    with tempfile.TemporaryDirectory(prefix="stream_probe_") as tmp:  # the loaded library outlives its file
        lib = load_probe(build_probe(f"{major}{minor}", Path(tmp)))
        ptxas = (Path(tmp) / "ptxas.txt").read_text()
    stream = torch.cuda.Stream()
    rows = []
    with torch.cuda.stream(stream):
        timer = Timer(torch, stream)
        sink = torch.zeros(8 * sms, dtype=torch.int32, device="cuda")
        handle = ctypes.c_void_p(stream.cuda_stream)
        for mb in SIZES_MB:
            nbytes = mb * 10**6 // 16 * 16
            src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
            dst = torch.empty(nbytes // 2 // 16 * 16, dtype=torch.uint8, device="cuda")
            contenders = passes(torch, lib, src, dst, sink.data_ptr(), sms, handle)
            for name, call in contenders.items():
                call()
                stream.synchronize()
                cold = timer.cold([call], REPS)
                st = summarize(cold["gpu"])
                rows.append({"MB": mb, "bytes": nbytes, "contender": name, "cold_gpu_us": st})
                print(
                    f"{mb:5d} MB  {name}: {st['median']:.1f} us ({nbytes / st['median'] / 1e6:.2f} TB/s)",
                    flush=True,
                )
            del src, dst
            torch.cuda.empty_cache()
    meta = {
        "command": " ".join(["python3", *sys.argv]),
        "gpu": props.name,
        "sms": sms,
        "l2_mb": round(timer.l2 / 2**20, 1),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    report = render(meta, rows)
    print(report)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(report)
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "ptxas.txt").write_text(ptxas)


def render(meta: dict, rows: list[dict]) -> str:
    """Per size: torch's passes, the copy probe, and the fastest and slowest read-probe configurations."""
    out = [
        "## Single-pass streaming floor",
        "",
        f"- command: `{meta['command']}`; GPU: {meta['gpu']} ({meta['sms']} SMs, L2 {meta['l2_mb']} MB); "
        f"torch {meta['torch']}; {meta['date']}",
        "- single cold calls (L2 flushed, GPU spin before the call, CUDA events), median (p10-p90) us; "
        "TB/s = bytes of the buffer (read; for copies, half read and half written) / median",
        "",
        "| MB | contender | cold us | TB/s |",
        "|---:|---|---:|---:|",
    ]
    for mb in dict.fromkeys(r["MB"] for r in rows):
        sized = [r for r in rows if r["MB"] == mb]
        probes = sorted(
            (r for r in sized if r["contender"].startswith("probe read")),
            key=lambda r: r["cold_gpu_us"]["median"],
        )
        shown = [r for r in sized if not r["contender"].startswith("probe read")]
        if probes:
            shown += [dict(probes[0], contender="best " + probes[0]["contender"])]
            shown += [dict(probes[-1], contender="worst " + probes[-1]["contender"])]
        for r in shown:
            st = r["cold_gpu_us"]
            out.append(
                f"| {mb} | {r['contender']} | {st['median']:.1f} ({st['p10']:.1f}-{st['p90']:.1f}) | "
                f"{r['bytes'] / st['median'] / 1e6:.2f} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for results.md, results.json and ptxas.txt")
    ap.add_argument(
        "--dry-run", action="store_true", help="no GPU: compile the probes for sm_90, print the plan"
    )
    args = ap.parse_args()
    if args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            build_probe("90", Path(tmp))
        print("\n".join(plan()))
        return
    run(args.out)


if __name__ == "__main__":
    main()
