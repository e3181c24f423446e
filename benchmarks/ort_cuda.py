"""ONNX Runtime's CUDA provider (the `ort-cuda` backend) against its CPU provider and PyTorch, on the GPU
machine with onnxruntime-gpu (shared/DEVICE.md). Every part writes JSON as it goes; a failing item is
logged with its traceback and the next one runs.

    python3 benchmarks/ort_cuda.py prepare --work W [--slice]   # exports + PyTorch references (no ORT GPU)
    python3 benchmarks/ort_cuda.py measure --work W --out DIR --parts diag,bench,validate-tiny,validate-slice

- prepare: exports of tiny-dense / tiny-moe (fp32, fp16, bf16, `lower --for ort`) and, with --slice, the
  2-layer Qwen3-30B-A3B slice (fp32, fp32 lowered, fp16); then PyTorch's logits, layer outputs and router
  logits on probe prompts: CPU fp32 (the reference validate uses), CUDA fp32 with TF32 off and on, CUDA fp16.
- diag: the same probes through ORT CPU, ORT CUDA with TF32 off (the backend's setting) and on (ORT's
  default). Against the CPU fp32 reference: logits max/mean |error| and top-1, the error at positions with
  and without a router top-k choice that differs from the reference's, per layer the relative error, the
  flipped choices (with the reference's margin between its k-th and (k+1)-th expert probability there)
  and the largest |activation| (fp16 overflow); and GPU vs CPU of the same graph (the first probe's number).
- bench: decode tokens/s, batch 1, a 128-token prompt, greedy, through the `run` loop (generate_reply),
  ort (CPU) vs ort-cuda, and with --ort-ops LIB also ort-cuda with our custom-op library (ExpertDispatch
  on our kernels) for canonical MoE graphs. The 8-layer slice runs on the GPU only. Graphs lowered with
  `--attention gqa` (`*-gqa`, fp16: ORT's CUDA GroupQueryAttention kernels are fp16/bf16) also get, with
  --static-cache N, a row on the static KV cache of N positions (`ort-cuda+static`) and, with --cuda-graph,
  the same runner with decode steps replayed from a captured CUDA graph (`ort-cuda+static+graph`).
- validate-tiny / validate-slice: `validate --backend ort-cuda` (the CLI for the tiny presets, the library
  with one loaded reference for the slice).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from ort_cuda_parts.artifacts import ARTIFACTS
from ort_cuda_parts.diag import diag
from ort_cuda_parts.prepare import export_all, prepare_references
from ort_cuda_parts.results import Results, guarded, log
from ort_cuda_parts.speed import bench, gpu_time, prefill_time, profile, torch_bench
from ort_cuda_parts.steps import kernel_cupti, steps
from ort_cuda_parts.validation import torch_floor, validate_matrix, validate_slice, validate_tiny


def environment() -> dict:
    """The library's record (Python, processor, package versions) plus the run's date and GPU."""
    import onnxruntime as ort
    import torch

    from qwen3_compile.environment import environment as software

    info = software() | {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "providers": ort.get_available_providers(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    except Exception as err:
        info["nvidia_smi"] = repr(err)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["prepare", "measure"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--slice", action="store_true", help="prepare: the 30B-A3B slice too")
    parser.add_argument("--no-references", action="store_true", help="prepare: exports only (for bench)")
    parser.add_argument("--ort-ops", type=Path, help="bench: libqmoe_ort.so, adds ort-cuda+ops rows")
    parser.add_argument("--parts", default="diag,bench,validate-tiny,validate-slice")
    parser.add_argument("--artifacts", help="comma-separated subset (default: every prepared one)")
    parser.add_argument("--steps", type=int, default=128, help="bench: decode steps")
    parser.add_argument("--no-transformers", action="store_true", help="steps: ORT contenders only")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="prefill-time: prompt tokens")
    parser.add_argument(
        "--static-cache",
        type=int,
        metavar="N",
        help="bench: GQA graphs also on a static KV cache of N positions (>= 128 + steps + 1)",
    )
    parser.add_argument(
        "--cuda-graph", action="store_true", help="bench: with --static-cache, also with CUDA graph capture"
    )
    parser.add_argument("--configs", default="ort-cpu,ort-cuda,ort-cuda-tf32", help="diag: ORT settings")
    parser.add_argument("--tag", default="", help="diag: suffix of the result keys (e.g. an env setting)")
    parser.add_argument("--long-context-tokens", type=int, default=1024, help="validate-slice")
    args = parser.parse_args()
    if args.cuda_graph and args.static_cache is None:
        parser.error("--cuda-graph needs --static-cache N (capture replays a static cache)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.command == "prepare":
        results = Results(work / "prepare.json")
        only = args.artifacts.split(",") if args.artifacts else None
        results.put(["exports"], export_all(work, args.slice, only))
        models = ["tiny-dense", "tiny-moe"] + (["slice"] if args.slice else [])
        if only:
            models = [m for m in models if any(ARTIFACTS[a].model == m for a in only)]
        if not args.no_references:
            results.put(["references"], prepare_references(work, models))
        log("prepare finished")
        (work / "prepare.done").write_text("ok")
        return
    import torch  # noqa: F401  (loads the CUDA libraries torch ships before ONNX Runtime's provider)

    from qwen3_compile.backends.onnxruntime.settings import require_cuda_provider

    require_cuda_provider("benchmarks/ort_cuda.py")
    out = args.out or work
    results = Results(out / "results.json")
    results.put(["environment"], guarded(results, ["environment"], environment))
    prepared = [a for a in ARTIFACTS if (work / a / "manifest.json").exists()]
    chosen = args.artifacts.split(",") if args.artifacts else prepared
    chosen = [a for a in chosen if a in prepared]
    for part in args.parts.split(","):  # in the order given
        if part == "diag":
            diag(
                work,
                results,
                [a for a in chosen if ARTIFACTS[a].dtype != "bf16"],
                args.configs.split(","),
                args.tag,
            )
        elif part == "bench":
            bench(work, results, chosen, args.steps, args.ort_ops, args.static_cache, args.cuda_graph)
        elif part == "profile":
            profile(work, results, chosen, args.ort_ops)
        elif part == "torch-bench":
            torch_bench(results, "slice8", args.steps)
        elif part == "prefill-time":
            prefill_time(work, results, chosen, args.ort_ops, args.prefill_tokens)
        elif part == "gpu-time":
            gpu_time(work, results, chosen, args.ort_ops, args.static_cache or 512)
        elif part == "validate-tiny":
            validate_tiny(work, results, out, [a for a in chosen if ARTIFACTS[a].model != "slice"])
        elif part == "steps":
            steps(work, results, chosen, args.ort_ops, args.steps, with_torch=not args.no_transformers)
        elif part == "kernel-cupti":
            kernel_cupti(results, args.ort_ops)
        elif part == "torch-floor":
            torch_floor(results, sorted({ARTIFACTS[a].model for a in chosen}), args.long_context_tokens)
        elif part == "validate-matrix":
            validate_matrix(work, results, chosen, args.ort_ops, args.long_context_tokens)
        elif part == "validate-slice":
            slices = [a for a in ("slice-fp32-ort", "slice-fp16", "slice-fp32") if a in chosen]
            validate_slice(work, results, slices, args.long_context_tokens)
    log("measure finished")


if __name__ == "__main__":
    main()
