"""bench, profile, gpu-time, prefill-time and torch-bench: decode and prefill speed through the `run` loop,
and where a step's GPU time goes (ORT's and torch's profilers)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ort_cuda_parts.artifacts import ARTIFACTS, MODELS
from ort_cuda_parts.results import Results, guarded

BENCH_PROMPT = np.random.default_rng(1).integers(0, 151643, 128).tolist()


def bench_runner(
    work: Path,
    name: str,
    ort_ops: Path | None,
    backend: str = "ort-cuda",
    static_cache: int | None = None,
    cuda_graph: bool = False,
):
    """The artifact's runner; with `ort_ops` the CUDA session registers our custom-op library, and ORT
    takes its ExpertDispatch kernel over the function body; `static_cache` / `cuda_graph`: OrtRunner's
    static KV cache of that many positions and CUDA graph capture of decode steps (GQA graphs)."""
    from qwen3_compile.backends.onnxruntime.loader import load_ort_runner
    from qwen3_compile.backends.onnxruntime.op_libraries import ORT_OPS_ENV
    from qwen3_compile.backends.registry import open_runner
    from qwen3_compile.storage.manifest import read_manifest

    os.environ.pop(ORT_OPS_ENV, None)
    if ort_ops is not None:
        os.environ[ORT_OPS_ENV] = str(ort_ops)
    try:
        manifest = read_manifest(work / name)
        if static_cache is not None:
            device = {"ort": "cpu", "ort-cuda": "cuda"}[backend]
            return load_ort_runner(
                work / name, manifest, device, static_cache_length=static_cache, enable_cuda_graph=cuda_graph
            )
        return open_runner(work / name, manifest, backend)
    finally:
        os.environ.pop(ORT_OPS_ENV, None)


def bench_one(
    work: Path,
    name: str,
    backend: str,
    steps: int,
    ort_ops: Path | None = None,
    static_cache: int | None = None,
    cuda_graph: bool = False,
) -> dict:
    from qwen3_compile.generation.loop import generate_reply

    slow = backend == "ort" and ARTIFACTS[name].model == "slice"
    runner = bench_runner(work, name, ort_ops, backend, static_cache, cuda_graph)
    ids = np.array([BENCH_PROMPT], dtype=np.int64)
    mask, positions = np.ones_like(ids), np.arange(128)[None]
    times = []
    for _ in range(2 if slow else 5):
        start = time.perf_counter()
        runner.forward(ids, mask, positions, runner.empty_cache(1))
        times.append(time.perf_counter() - start)
    n = 16 if slow else steps
    generate_reply(runner, BENCH_PROMPT, 4, lambda x: int(x.argmax()), stop_ids=())  # warm-up
    reply = generate_reply(runner, BENCH_PROMPT, n, lambda x: int(x.argmax()), stop_ids=())
    return {
        "prefill_128_ms_median": round(1000 * float(np.median(times)), 2),
        "decode_steps": len(reply.generated_ids) - 1,
        "decode_tokens_per_s": round(reply.tokens_per_s, 1),
        "ms_per_token": round(1000 / reply.tokens_per_s, 3),
        "first_tokens": reply.generated_ids[:8],
    }


def bench(
    work: Path,
    results: Results,
    artifacts: list[str],
    steps: int,
    ort_ops: Path | None,
    static_cache: int | None = None,
    cuda_graph: bool = False,
) -> None:
    for name in artifacts:
        spec = ARTIFACTS[name]
        for backend in ("ort-cuda", "ort"):
            if backend == "ort" and (spec.dtype == "bf16" or spec.model == "slice8"):
                continue  # ORT's CPU provider has no bf16 kernels for these ops; 8 layers are GPU-only
            guarded(results, ["bench", name, backend], bench_one, work, name, backend, steps)
        if ort_ops is not None and spec.keeps_expert_dispatch and spec.preset != "tiny-dense":
            guarded(
                results, ["bench", name, "ort-cuda+ops"], bench_one, work, name, "ort-cuda", steps, ort_ops
            )
        if static_cache is not None and spec.attention == "gqa":  # the same graph, static cache, +capture
            with_ops = (None, ort_ops) if ort_ops is not None and spec.keeps_expert_dispatch else (None,)
            for ops in with_ops:
                for graph in (False, True) if cuda_graph else (False,):
                    key = "ort-cuda" + ("+ops" if ops else "") + "+static" + ("+graph" if graph else "")
                    args = (work, name, "ort-cuda", steps, ops, static_cache, graph)
                    guarded(results, ["bench", name, key], bench_one, *args)


def profile_one(work: Path, name: str, ort_ops: Path | None, steps: int = 32) -> dict:
    """ORT's own per-node profile of `steps` greedy decode steps after a 128-token prompt, summed by op
    type per step. On the CUDA provider these are host-side times (launch and any synchronous work), not
    GPU time: their total against the measured step time says whether decode is launch-bound."""
    import qwen3_compile.backends.onnxruntime.runner as ort_runner
    from qwen3_compile.generation.loop import generate_reply

    plain = ort_runner.session_options

    def profiling(*args, **kwargs):
        options = plain(*args, **kwargs)
        options.enable_profiling = True
        options.profile_file_prefix = str(work / f"profile-{name}")
        return options

    ort_runner.session_options = profiling
    try:
        runner = bench_runner(work, name, ort_ops)
    finally:
        ort_runner.session_options = plain
    generate_reply(runner, BENCH_PROMPT, 4, lambda x: int(x.argmax()), stop_ids=())
    start = time.perf_counter()
    reply = generate_reply(runner, BENCH_PROMPT, steps, lambda x: int(x.argmax()), stop_ids=())
    wall = time.perf_counter() - start
    trace = json.loads(Path(runner.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[-(len(reply.generated_ids) - 1) :]  # the single-token steps (after the prefill run)
    first = decode_runs[0]["ts"] if decode_runs else 0
    by_op: dict[str, float] = {}
    for e in trace:
        if e.get("cat") == "Node" and e.get("ts", 0) >= first and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    n = max(len(decode_runs), 1)
    return {
        "decode_steps": len(decode_runs),
        "ms_per_token_wall": round(1000 * wall / steps, 3),
        "model_run_ms": round(float(np.median([e["dur"] for e in decode_runs])) / 1000, 3)
        if decode_runs
        else None,
        "node_host_ms_per_step": round(sum(by_op.values()) / n / 1000, 3),
        "by_op_ms_per_step": {
            k: round(v / n / 1000, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])
        },
    }


def profile(work: Path, results: Results, artifacts: list[str], ort_ops: Path | None) -> None:
    for name in artifacts:
        guarded(results, ["profile", name, "ort-cuda"], profile_one, work, name, None)
        if ort_ops is not None and ARTIFACTS[name].keeps_expert_dispatch:
            guarded(results, ["profile", name, "ort-cuda+ops"], profile_one, work, name, ort_ops)


# kernel name (lower case) -> category, first match wins: MoE (ours and ORT's), attention, matmuls, norms
KERNEL_CATEGORIES = (
    # ours (qmoe::), ORT's MoE (cutlass_kernels::, its grouped GEMMs, routing), the inlined body's TopK
    (
        "moe",
        (
            "qmoe",
            "moe",
            "topk",
            "expandinputrows",
            "finalize",
            "gating",
            "cutlass_kernels",
            "groupproblemshape",
        ),
    ),
    ("attention", ("flash", "attention", "attn", "xqa", "rope", "mha", "gqa", "sequencelengths", "concatkv")),
    (
        "matmul",
        ("nvjet", "gemm", "gemv", "xmma", "cublas", "cutlass", "matmul"),
    ),  # nvjet: cuBLAS's sm90 kernels
    ("norm", ("layernorm", "layer_norm", "rmsnorm")),
)


def _kernel_category(name: str) -> str:
    lower = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in lower for k in keys)), "other")


def gpu_time_one(
    work: Path,
    name: str,
    ort_ops: Path | None,
    static_cache: int | None = None,
    cuda_graph: bool = False,
    steps: int = 64,
) -> dict:
    """GPU time of `steps` greedy decode steps after a 128-token prompt: every CUDA kernel the process runs
    (ORT's and ours, captured graphs included) as CUPTI reports it through torch.profiler, summed per step by
    category (KERNEL_CATEGORIES) and by kernel, against the wall time per step. Kernel time well below the
    wall time means the step waits on the host (launches, synchronization)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = bench_runner(work, name, ort_ops, "ort-cuda", static_cache, cuda_graph)
    prompt = np.array([BENCH_PROMPT], dtype=np.int64)

    def decode(count: int) -> float:
        cache = runner.empty_cache(1)
        logits, cache = runner.forward(prompt, np.ones_like(prompt), np.arange(128)[None], cache)
        token, length = int(logits[0, -1].argmax()), 128
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(count):
            length += 1
            ids = np.array([[token]], dtype=np.int64)
            logits, cache = runner.forward(
                ids, np.ones((1, length), np.int64), np.array([[length - 1]]), cache
            )
            token = int(logits[0, -1].argmax())
        torch.cuda.synchronize()
        return time.perf_counter() - start

    decode(8)  # warm-up (and, with cuda_graph, the capture)
    wall_plain = decode(steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = decode(steps)
    by_kernel = kernel_times(prof)
    # the profiled window also holds the prefill's kernels: subtract a profiled prefill alone
    with profile(activities=[ProfilerActivity.CUDA]) as prefill_prof:
        decode(0)
    for kernel, us in kernel_times(prefill_prof).items():
        if kernel in by_kernel:
            by_kernel[kernel] -= us
    per_step = {k: v / steps for k, v in by_kernel.items() if v > 0}
    return {
        "steps": steps,
        "ms_per_token_wall": round(1000 * wall_plain / steps, 3),
        "ms_per_token_wall_profiled": round(1000 * wall / steps, 3),
        **kernel_summary(per_step, "per_token"),
    }


def kernel_times(prof) -> dict[str, float]:
    """Device microseconds by kernel name over a torch.profiler window."""
    by_kernel: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if device_us:
            by_kernel[event.key] = by_kernel.get(event.key, 0.0) + device_us
    return by_kernel


def kernel_summary(us_by_kernel: dict[str, float], unit: str) -> dict:
    by_category: dict[str, float] = {}
    for kernel, us in us_by_kernel.items():
        by_category[_kernel_category(kernel)] = by_category.get(_kernel_category(kernel), 0.0) + us
    top = sorted(us_by_kernel.items(), key=lambda kv: -kv[1])[:20]
    return {
        f"gpu_kernel_ms_{unit}": round(sum(us_by_kernel.values()) / 1000, 3),
        f"by_category_ms_{unit}": {k: round(v / 1000, 4) for k, v in sorted(by_category.items())},
        f"top_kernels_us_{unit}": {k[:160]: round(v, 2) for k, v in top},
    }


def prefill_time_one(
    work: Path, name: str, ort_ops: Path | None, tokens: int, static_cache: int | None
) -> dict:
    """One prefill of `tokens` random tokens from an empty cache: the median wall time of 3 (host clock,
    logits copied to the host as the runner does) and the GPU kernel time of one more, by category."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = bench_runner(work, name, ort_ops, "ort-cuda", static_cache, False)
    prompt = np.random.default_rng(2).integers(0, 151643, (1, tokens))

    def prefill() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.forward(prompt, np.ones_like(prompt), np.arange(tokens)[None], runner.empty_cache(1))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    prefill()  # warm-up
    walls = [prefill() for _ in range(3)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill()
    return {
        "tokens": tokens,
        "wall_ms_median": round(1000 * float(np.median(walls)), 2),
        "wall_ms": [round(1000 * w, 2) for w in walls],
        **kernel_summary(kernel_times(prof), "per_prefill"),
    }


def prefill_time(
    work: Path, results: Results, artifacts: list[str], ort_ops: Path | None, tokens: int
) -> None:
    """prefill-time part: each artifact (GQA ones on a static cache of tokens + 1 positions), and with our
    custom op where --ort-ops is given and the graph keeps ExpertDispatch."""
    for name in artifacts:
        spec = ARTIFACTS[name]
        cache = tokens + 1 if spec.attention == "gqa" else None
        for ops in [None, ort_ops] if ort_ops is not None and spec.keeps_expert_dispatch else [None]:
            key = "ort-cuda" + ("+ops" if ops else "") + ("+static" if cache else "")
            guarded(
                results,
                ["prefill-time", name, key, str(tokens)],
                prefill_time_one,
                work,
                name,
                ops,
                tokens,
                cache,
            )


def gpu_time(
    work: Path, results: Results, artifacts: list[str], ort_ops: Path | None, static_cache: int | None
) -> None:
    """gpu-time part: each artifact as ORT runs it; GQA artifacts with the static cache, with and without
    capture; canonical-MoE artifacts also with our custom op when --ort-ops is given."""
    for name in artifacts:
        spec = ARTIFACTS[name]
        cache_modes = (
            [(static_cache, False), (static_cache, True)] if spec.attention == "gqa" else [(None, False)]
        )
        ops_modes = [None, ort_ops] if ort_ops is not None and spec.keeps_expert_dispatch else [None]
        for ops in ops_modes:
            for cache, graph in cache_modes:
                if spec.attention == "gqa" and cache is None:
                    continue  # GQA decodes through a static cache (the growing one is pathologically slow)
                key = (
                    "ort-cuda"
                    + ("+ops" if ops else "")
                    + ("+static" if cache else "")
                    + ("+graph" if graph else "")
                )
                guarded(results, ["gpu-time", name, key], gpu_time_one, work, name, ops, cache, graph)


# transformers on the same GPU: (experts implementation, KV cache, torch.compile); its own greedy loop
TORCH_BENCH = (
    ("eager", "dynamic", False),
    ("grouped_mm", "dynamic", False),
    ("batched_mm", "dynamic", False),
    ("grouped_mm", "static", False),
    ("grouped_mm", "static", True),
    ("batched_mm", "static", True),
)


def torch_bench(results: Results, model_name: str, steps: int) -> None:
    """torch-bench part: transformers' `generate` on the preset's PyTorch model in fp16 (the weights the
    exports were made from), batch 1, the bench prompt, greedy. Decode rate = `steps` / (time of 1 + steps
    new tokens - time of 1 new token), host clock around each call, median of 3; each variant warmed up
    (and compiled) first. Static-cache variants with compile let `generate` compile the step."""
    import torch

    from qwen3_compile.models.loading import load_model

    preset, layers = MODELS[model_name]
    model = load_model(preset, num_layers=layers, dtype=torch.float16).model.cuda().eval()
    prompt = torch.tensor([BENCH_PROMPT], device="cuda")
    for impl, cache, compiled in TORCH_BENCH:
        key = f"transformers-{impl}-{cache}" + ("-compiled" if compiled else "")

        def one(impl=impl, cache=cache, compiled=compiled) -> dict:
            if hasattr(model, "set_experts_implementation"):
                model.set_experts_implementation(impl)
            else:
                model.config._experts_implementation = impl
            extra = {"cache_implementation": "static"} if cache == "static" else {}
            model.generation_config.disable_compile = not compiled

            def generate(new: int) -> tuple[float, list[int]]:
                torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(
                        prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra
                    )
                torch.cuda.synchronize()
                return time.perf_counter() - start, out[0, 128:].tolist()

            generate(steps + 1)  # warm-up (compile)
            firsts = [generate(1)[0] for _ in range(3)]
            runs = [generate(steps + 1) for _ in range(3)]
            decode = float(np.median([r[0] for r in runs])) - float(np.median(firsts))
            torch.cuda.reset_peak_memory_stats()
            generate(steps + 1)
            return {
                "decode_tokens_per_s": round(steps / decode, 1),
                "ms_per_token": round(1000 * decode / steps, 3),
                "prefill_128_ms_median": round(1000 * float(np.median(firsts)), 2),
                "first_tokens": runs[0][1][:8],
                "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            }

        guarded(results, ["torch-bench", model_name, key], one)
