"""steps and kernel-cupti: one decode loop, measured the same way for every contender (ours, ORT's MoE,
transformers), against the weight-bandwidth roofline of the same run; and the MoE node's kernel time
inside the graph against the same kernels called standalone."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ort_cuda_parts.artifacts import ARTIFACTS, MODELS, SLICE
from ort_cuda_parts.results import Results, guarded
from ort_cuda_parts.speed import BENCH_PROMPT, bench_runner, kernel_times


def timed_steps(step, first: int, count: int) -> tuple[float, list[int]]:
    """Host clock over `count` greedy steps; `step(token, position) -> next token` as a Python int (so each
    step ends with the token on the host, as a streaming loop needs it)."""
    token, position, tokens = first, len(BENCH_PROMPT), []
    start = time.perf_counter()
    for _ in range(count):
        token = step(token, position)
        position += 1
        tokens.append(token)
    return time.perf_counter() - start, tokens


def ort_stepper(work: Path, name: str, ort_ops: Path | None, static_cache: int, on_device: bool = True):
    """(prefill() -> first token, step) for a GQA artifact on a static cache with CUDA graph capture. A
    deployment graph (`--logits last`) picks the greedy token on the device when `on_device` (`run`'s
    greedy loop does that); otherwise the logits come to the host and numpy picks it."""
    runner = bench_runner(work, name, ort_ops, "ort-cuda", static_cache, True)
    greedy = on_device and runner.greedy
    state = {}

    def call(ids, mask, positions) -> int:
        if greedy:
            tokens, _, state["cache"] = runner.forward_greedy(ids, mask, positions, state["cache"])
            return int(tokens[0])
        logits, state["cache"] = runner.forward(ids, mask, positions, state["cache"])
        return int(logits[0, -1].argmax())

    def prefill() -> int:
        state["cache"] = runner.empty_cache(1)
        ids = np.array([BENCH_PROMPT], dtype=np.int64)
        return call(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])

    def step(token: int, position: int) -> int:
        ids = np.array([[token]], dtype=np.int64)
        return call(ids, np.ones((1, position + 1), dtype=np.int64), np.array([[position]]))

    return prefill, step


def torch_stepper(model, static_cache: int):
    """transformers' model (fp16, its batched_mm experts) on its StaticCache, the decode step compiled with
    torch.compile(mode="reduce-overhead") (CUDA graphs), greedy argmax on the GPU, the token read back."""
    import torch
    from transformers import StaticCache

    from qwen3_compile.backends.torch_reference import cache_argument

    cache = StaticCache(config=model.config, max_cache_len=static_cache)
    kwarg = cache_argument(model)

    def forward(ids, positions):
        out = model(
            input_ids=ids,
            position_ids=positions,
            cache_position=positions[0],
            use_cache=True,
            **{kwarg: cache},
        )
        return out.logits[:, -1].argmax(-1)

    compiled = torch.compile(forward, mode="reduce-overhead", fullgraph=True)

    def prefill() -> int:
        cache.reset()
        with torch.no_grad():
            ids = torch.tensor([BENCH_PROMPT], device="cuda")
            return int(forward(ids, torch.arange(ids.shape[1], device="cuda")[None]))

    def step(token: int, position: int) -> int:
        with torch.no_grad():
            ids = torch.tensor([[token]], device="cuda")
            return int(compiled(ids, torch.tensor([[position]], device="cuda")))

    return prefill, step


def weight_bytes_per_token(arch, dtype_bytes: int = 2) -> int:
    """Weights one decode step reads at batch 1: every non-expert matrix and norm, the router, the top-k
    experts of each layer (k distinct experts), lm_head; not the embedding table (one row is gathered)."""
    h = arch.hidden_size
    attn = h * arch.q_dim + 2 * h * arch.kv_dim + arch.q_dim * h
    experts = arch.top_k * 3 * h * arch.moe_intermediate_size + arch.num_experts * h
    norms = 2 * h + 2 * arch.head_dim  # input and post-attention RMSNorms, the q and k norms
    return dtype_bytes * (arch.num_layers * (attn + experts + norms) + h + arch.vocab_size * h)


def copy_bandwidth(reps: int = 5) -> list[float]:
    """Device-to-device copy of 2 GB, CUDA events: bytes read + written per second, each repetition."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    out = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        out.append(2 * src.numel() * 2 / (a.elapsed_time(b) / 1000))
    return out[1:]


def steps(
    work: Path,
    results: Results,
    artifacts: list[str],
    ort_ops: Path | None,
    count: int,
    with_torch: bool = True,
) -> None:
    """steps part: every contender decodes `count` greedy tokens after the bench prompt through ONE loop
    (`timed_steps`: host clock, token on the host each step), each captured in a CUDA graph, warmed up
    the same way (a prefill and `count` steps, compilation included), in interleaved rounds: our custom
    op and ORT's MoE (GQA artifacts on a static cache) and transformers (compiled, static cache)."""
    import torch

    from qwen3_compile.models.loading import load_model, resolve_model

    static = len(BENCH_PROMPT) + count + 8
    contenders = {}
    for name in artifacts:
        if ARTIFACTS[name].attention != "gqa":
            continue
        ops = ort_ops if ARTIFACTS[name].keeps_expert_dispatch else None
        for on_device in (True, False) if ARTIFACTS[name].logits == "last" else (False,):
            key = name + ("+ops" if ops else "") + ("" if on_device else "+host-argmax")
            contenders[key] = lambda name=name, ops=ops, on_device=on_device: ort_stepper(
                work, name, ops, static, on_device
            )
    preset, layers = MODELS["slice8"]

    def transformers_contender():  # loaded inside its warm-up, so its memory counts as its own
        model = load_model(preset, num_layers=layers, dtype=torch.float16, device="cuda").model.eval()
        model.set_experts_implementation("batched_mm")
        return torch_stepper(model, static)

    if with_torch:
        contenders["transformers-batched_mm-static-compiled"] = transformers_contender
    ready = {}
    peaks = []  # torch's peak of each warm-up: the warm-ups reset it, the summary reports the run's
    for key, make in contenders.items():

        def warm(make=make, key=key) -> dict:
            free_before = torch.cuda.mem_get_info()[0]
            reserved_before = torch.cuda.memory_reserved()
            torch.cuda.reset_peak_memory_stats()
            prefill, step = make()
            start = time.perf_counter()
            timed_steps(step, prefill(), count)
            ready[key] = (prefill, step)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
            # device-wide: ORT's arena and weights (cudaMalloc outside torch's allocator) or torch's own
            return {
                "warm_up_s": round(time.perf_counter() - start, 1),
                "gpu_memory_added_gb": round((free_before - torch.cuda.mem_get_info()[0]) / 1e9, 2),
                # torch's share of it (the KV cache and I/O buffers, or transformers' whole model), and the
                # allocator's peak during the warm-up (transformers' prefill gathers expert weights per token)
                "torch_reserved_added_gb": round((torch.cuda.memory_reserved() - reserved_before) / 1e9, 2),
                "torch_peak_allocated_gb": round(peaks[-1] / 1e9, 2),
            }

        guarded(results, ["steps", "warm-up", key], warm)
    rates: dict[str, list[float]] = {k: [] for k in ready}
    firsts: dict[str, list[int]] = {}
    for _ in range(3):
        for key, (prefill, step) in ready.items():
            torch.cuda.synchronize()
            seconds, tokens = timed_steps(step, prefill(), count)
            rates[key].append(round(count / seconds, 1))
            firsts[key] = tokens[:16]
    bandwidth = copy_bandwidth()
    arch = resolve_model(preset, layers).arch
    roofline = float(np.median(bandwidth)) / weight_bytes_per_token(arch)
    results.put(
        ["steps", "summary"],
        {
            "count": count,
            "tokens_per_s_by_round": rates,
            "median_tokens_per_s": {k: float(np.median(v)) for k, v in rates.items()},
            "first_tokens": firsts,
            "same_tokens": len({tuple(v) for v in firsts.values()}) == 1,
            "copy_bandwidth_gb_s": [round(b / 1e9, 1) for b in bandwidth],
            "weight_bytes_per_token": weight_bytes_per_token(arch),
            "roofline_tokens_per_s": round(roofline, 1),
            "peak_gpu_memory_gb_torch": round(max([*peaks, torch.cuda.max_memory_allocated()]) / 1e9, 2),
        },
    )


def kernel_cupti(results: Results, ort_ops: Path | None, count: int = 64) -> None:
    """kernel-cupti part: our MoE kernels called standalone (libqmoe.so beside libqmoe_ort.so, the same
    objects) at the slice's decode shape, fp16, T=1, cycling through 8 weight sets as the 8 layers do,
    `count` rounds; CUPTI kernel time per call through torch.profiler, the method gpu-time uses inside ORT."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from qwen3_compile.kernels import moe as kmoe
    from qwen3_compile.models.presets import get_preset

    arch = get_preset(SLICE).arch
    h, inter, e, k = arch.hidden_size, arch.moe_intermediate_size, arch.num_experts, arch.top_k
    library = str(Path(ort_ops).with_name("libqmoe.so")) if ort_ops else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [
        (
            torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.float16, generator=gen) * h**-0.5,
            torch.randn(e, h, inter, device="cuda", dtype=torch.float16, generator=gen) * inter**-0.5,
        )
        for _ in range(8)
    ]
    xs = [torch.randn(1, h, device="cuda", dtype=torch.float16, generator=gen) for _ in range(8)]
    logits = [torch.randn(1, e, device="cuda", dtype=torch.float32, generator=gen) for _ in range(8)]
    outs = [torch.empty_like(x) for x in xs]

    def run(rounds: int) -> None:
        for _ in range(rounds):
            for (gu, dn), x, lg, o in zip(layers, xs, logits, outs, strict=True):
                kmoe.moe_forward(x, lg, gu, dn, k, True, out=o, library=library)
        torch.cuda.synchronize()

    run(4)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(count)
    by_kernel = kernel_times(prof)
    per_call = {name: us / (8 * count) for name, us in by_kernel.items()}
    results.put(
        ["kernel-cupti"],
        {
            "calls": 8 * count,
            "us_per_call_all_kernels": round(sum(per_call.values()), 2),
            "us_per_call_by_kernel": {
                n[:120]: round(v, 2) for n, v in sorted(per_call.items(), key=lambda kv: -kv[1])
            },
            "library": library or "built for this GPU",
        },
    )
