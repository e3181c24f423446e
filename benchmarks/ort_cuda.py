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
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SLICE = "qwen3-30b-a3b"
Q06 = "qwen3-0.6b"  # its 2-layer slice (dense)


@dataclass(frozen=True)
class Spec:
    preset: str
    dtype: str
    lowered_from: str | None = None  # `lower --for ort` of this artifact
    layers: int | None = None
    moe_lowering: str | None = None  # custom-op: the norms fused, ExpertDispatch kept for --ort-ops
    attention: str = "standard"  # gqa: `lower --attention gqa` (GroupQueryAttention, static cache)
    logits: str = "all"  # last: `lower --logits last` (a deployment graph: run, bench; not validate)

    @property
    def keeps_expert_dispatch(self) -> bool:
        return self.lowered_from is None or self.moe_lowering == "custom-op"

    @property
    def model(self) -> str:
        if self.preset != SLICE:
            return self.preset
        return "slice" if self.layers == 2 else f"slice{self.layers}"


ARTIFACTS = {
    "tiny-dense-fp32": Spec("tiny-dense", "fp32"),
    "tiny-dense-fp16": Spec("tiny-dense", "fp16"),
    "tiny-dense-bf16": Spec("tiny-dense", "bf16"),
    "tiny-moe-fp32": Spec("tiny-moe", "fp32"),
    "tiny-moe-fp16": Spec("tiny-moe", "fp16"),
    "tiny-moe-fp32-ort": Spec("tiny-moe", "fp32", "tiny-moe-fp32"),
    "slice-fp32": Spec(SLICE, "fp32", layers=2),
    "slice-fp32-ort": Spec(SLICE, "fp32", "slice-fp32", layers=2),
    "slice-fp16": Spec(SLICE, "fp16", layers=2),
    # decode speed at depth: 8 layers, where per-layer work outweighs the per-step fixed costs
    "slice8-fp16": Spec(SLICE, "fp16", layers=8),
    "slice8-fp16-norm": Spec(SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="custom-op"),
    # ORT's own fp16 MoE (CUDA) with the norms fused: the comparator of our custom op
    "slice8-fp16-moe": Spec(SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="ort-moe"),
    "slice8-fp16-moe-gqa": Spec(
        SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="ort-moe", attention="gqa"
    ),
    # GroupQueryAttention, for the static cache and CUDA graph rows of bench
    "tiny-dense-fp16-gqa": Spec("tiny-dense", "fp16", "tiny-dense-fp16", attention="gqa"),
    "tiny-moe-fp16-gqa": Spec("tiny-moe", "fp16", "tiny-moe-fp16", attention="gqa"),
    "slice8-fp16-gqa": Spec(SLICE, "fp16", "slice8-fp16", layers=8, attention="gqa"),
    "slice8-fp16-norm-gqa": Spec(
        SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="custom-op", attention="gqa"
    ),
    # deployment graphs (`--logits last`): the same decode step; the prefill computes and copies one row
    "slice8-fp16-norm-gqa-last": Spec(
        SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="custom-op", attention="gqa", logits="last"
    ),
    "slice8-fp16-moe-gqa-last": Spec(
        SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="ort-moe", attention="gqa", logits="last"
    ),
    # GPU parity (validate-matrix): every model in fp16 and bf16, MoE through the ExpertDispatch body, our
    # custom op (the canonical graph with --ort-ops) and ORT's MoE (`--moe-lowering ort-moe`)
    "tiny-moe-bf16": Spec("tiny-moe", "bf16"),
    "tiny-moe-fp16-moe": Spec("tiny-moe", "fp16", "tiny-moe-fp16", moe_lowering="ort-moe"),
    "tiny-moe-bf16-moe": Spec("tiny-moe", "bf16", "tiny-moe-bf16", moe_lowering="ort-moe"),
    "q06-fp16": Spec(Q06, "fp16", layers=2),
    "q06-bf16": Spec(Q06, "bf16", layers=2),
    "slice8-bf16": Spec(SLICE, "bf16", layers=8),
    "slice8-bf16-moe": Spec(SLICE, "bf16", "slice8-bf16", layers=8, moe_lowering="ort-moe"),
}
MODELS = {
    "tiny-dense": ("tiny-dense", None),
    "tiny-moe": ("tiny-moe", None),
    "slice": (SLICE, 2),
    "slice8": (SLICE, 8),
    Q06: (Q06, 2),
}
TORCH_VARIANTS = ("cpu-fp32", "cuda-fp32", "cuda-fp32-tf32", "cuda-fp16")
# name -> (device, use_tf32, graph optimization level; None: the artifact's recorded one)
ORT_CONFIGS = {
    "ort-cpu": ("cpu", "0", None),
    "ort-cuda": ("cuda", "0", None),
    "ort-cuda-tf32": ("cuda", "1", None),
    "ort-cuda-basic": ("cuda", "0", "basic"),  # ORT's fusions (RMSNorm, GELU/SiLU, ...) off
}


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


class Results:
    """One JSON file, rewritten after every item."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def put(self, keys: list[str], value) -> None:
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=_plain))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def guarded(results: Results, keys: list[str], fn, *args, **kwargs):
    start = time.perf_counter()
    log("start", "/".join(keys))
    try:
        value = fn(*args, **kwargs)
    except Exception as err:
        log("FAILED", "/".join(keys), repr(err))
        traceback.print_exc()
        value = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(value, dict):
        value = value | {"seconds": round(time.perf_counter() - start, 2)}
    results.put(keys, value)
    log("done", "/".join(keys), f"{time.perf_counter() - start:.1f} s")
    return value


# ---------------------------------------------------------------- probes


def probes(model: str) -> list[list[int]]:
    """The parity chat prompts in both modes and two random 128-token prompts (the first probe's shape);
    the validate runs cover the prompt suite."""
    from qwen3_compile.parity import parity_prompts
    from qwen3_compile.tokenizer import load_tokenizer

    ids, _ = parity_prompts(load_tokenizer())
    rng = np.random.default_rng(0)
    return ids + [rng.integers(0, 151643, 128).tolist() for _ in range(2)]


# ---------------------------------------------------------------- prepare


def export_all(work: Path, with_slice: bool, only: list[str] | None = None) -> dict:
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.lower.stage import lower_artifact

    done = {}
    for name, spec in ARTIFACTS.items():
        if spec.preset == SLICE and not with_slice or only and name not in only:
            continue
        folder = work / name
        if (folder / "manifest.json").exists():
            continue
        start = time.perf_counter()
        try:
            if spec.lowered_from:
                lower_artifact(
                    work / spec.lowered_from,
                    folder,
                    "ort",
                    moe_lowering=spec.moe_lowering,
                    attention=spec.attention,
                    logits=spec.logits,
                )
            else:
                export_onnx(spec.preset, folder, ExportOptions(dtype=spec.dtype), num_layers=spec.layers)
            done[name] = round(time.perf_counter() - start, 1)
        except Exception as err:
            traceback.print_exc()
            done[name] = f"failed: {err!r}"
        log("export", name, done[name])
    return done


def torch_capture(model, prompts: list[list[int]], device: str) -> dict[str, np.ndarray]:
    """Logits, every layer's output and every MoE layer's router logits, prefill of each prompt."""
    import torch

    layers = model.model.layers
    captured: dict[str, list] = {}

    def keep(key):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            value = value[0] if value.dim() == 3 else value
            captured.setdefault(key, []).append(value.detach().float().cpu().numpy())

        return hook

    handles = [layer.register_forward_hook(keep(f"layer{i}")) for i, layer in enumerate(layers)]
    handles += [
        layer.mlp.gate.register_forward_hook(keep(f"router{i}"))
        for i, layer in enumerate(layers)
        if hasattr(layer.mlp, "gate")
    ]
    logits = []
    try:
        with torch.no_grad():
            for ids in prompts:
                out = model(torch.tensor([ids], device=device), use_cache=False)
                logits.append(out.logits[0].float().cpu().numpy())
    finally:
        for handle in handles:
            handle.remove()
    return {"logits": np.concatenate(logits)} | {k: np.concatenate(v) for k, v in captured.items()}


def prepare_references(work: Path, models: list[str]) -> dict:
    import torch

    from qwen3_compile.models.loading import load_model

    info = {}
    for key in models:
        preset, layers = MODELS[key]
        prompts = probes(key)
        (work / f"probes-{key}.json").write_text(json.dumps(prompts))
        start = time.perf_counter()
        model = load_model(preset, num_layers=layers).model
        info[f"{key}/load_s"] = round(time.perf_counter() - start, 1)
        for variant in TORCH_VARIANTS:
            start = time.perf_counter()
            try:
                if variant.startswith("cuda"):
                    model = model.to("cuda")
                    torch.backends.cuda.matmul.allow_tf32 = variant.endswith("tf32")
                    if variant.endswith("fp16"):
                        model = model.half()
                arrays = torch_capture(model, prompts, "cuda" if variant.startswith("cuda") else "cpu")
                np.savez(work / f"ref-{key}-{variant}.npz", **arrays)
                info[f"{key}/{variant}"] = round(time.perf_counter() - start, 1)
            except Exception as err:
                traceback.print_exc()
                info[f"{key}/{variant}"] = f"failed: {err!r}"
            log("reference", key, variant, info[f"{key}/{variant}"])
        torch.backends.cuda.matmul.allow_tf32 = False
        del model
        torch.cuda.empty_cache()
    return info


# ---------------------------------------------------------------- diag


def router_names(model_path: Path) -> list[str]:
    """Each MoE layer's router logits: input 1 of its ExpertDispatch (canonical) or MoE (lowered) node."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.input[1] for n in graph.node if n.op_type in ("ExpertDispatch", "MoE", "QMoE")]


def ort_capture(
    folder: Path, prompts, device: str, tf32: str, optimization: str | None = None
) -> dict[str, np.ndarray]:
    from types import SimpleNamespace

    from qwen3_compile.backends.onnxruntime.layer_outputs import artifact_tensors
    from qwen3_compile.backends.onnxruntime.settings import ort_session_config
    from qwen3_compile.graph_contract import layer_output_name
    from qwen3_compile.storage.manifest import read_manifest

    manifest = read_manifest(folder)
    num_layers = int(manifest.architecture["num_hidden_layers"])
    routers = router_names(folder / "model.onnx")
    names = ["logits"] + [layer_output_name(i) for i in range(num_layers)] + routers
    settings = manifest
    if optimization is not None:
        settings = SimpleNamespace(
            ort_optimization=optimization, ort_session_config=ort_session_config(manifest)
        )
    found = artifact_tensors(
        folder / "model.onnx",
        names,
        prompts,
        settings,
        device,
        {"use_tf32": tf32} if device == "cuda" else None,
    )
    out = {"logits": found["logits"]}
    out |= {f"layer{i}": found[layer_output_name(i)] for i in range(num_layers)}
    out |= {f"router{i}": found[name] for i, name in enumerate(routers)}
    return out


def topk_sets(router_logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top-k expert ids sorted per token, margin p_k - p_(k+1) of the softmax)."""
    z = router_logits - router_logits.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    top = np.sort(order[:, :k], axis=-1)
    ranked = np.take_along_axis(p, order[:, : k + 1], axis=-1)
    return top, ranked[:, k - 1] - ranked[:, k]


def compare(ref: dict, got: dict, top_k: int | None, prompt_lengths: list[int]) -> dict:
    r, g = ref["logits"], got["logits"]
    err = np.abs(r - g)
    per_position = err.max(-1)
    out = {
        "positions": int(r.shape[0]),
        "logit_std": float(r.std()),
        "logits_max_abs": float(err.max()),
        "logits_mean_abs": float(err.mean()),
        "logits_p999_position_max": float(np.quantile(per_position, 0.999)),
        "top1": float((r.argmax(-1) == g.argmax(-1)).mean()),
        "nonfinite_logits": int((~np.isfinite(g)).sum()),
        "layers": [],
    }
    starts = np.cumsum([0] + prompt_lengths[:-1])
    out["per_prompt_max_abs"] = [
        float(per_position[s : s + n].max()) for s, n in zip(starts, prompt_lengths, strict=True)
    ]
    flipped_any = np.zeros(r.shape[0], dtype=bool)
    i = 0
    while f"layer{i}" in ref:
        a, b = ref[f"layer{i}"], got[f"layer{i}"]
        layer = {
            "rel_err": float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-30)),
            "max_abs_activation": float(np.nanmax(np.abs(b))) if np.isfinite(b).any() else None,
            "ref_max_abs_activation": float(np.abs(a).max()),
            "nonfinite": int((~np.isfinite(b)).sum()),
        }
        if top_k and f"router{i}" in ref and f"router{i}" in got:
            rr, gr = ref[f"router{i}"], got[f"router{i}"]
            ref_top, margin = topk_sets(rr, top_k)
            got_top, _ = topk_sets(gr, top_k)
            flipped = (ref_top != got_top).any(-1)
            flipped_any |= flipped
            layer |= {
                "router_rel_err": float(np.linalg.norm(rr - gr) / (np.linalg.norm(rr) + 1e-30)),
                "router_max_abs_err": float(np.abs(rr - gr).max()),
                "tokens_flipped": int(flipped.sum()),
                "experts_flipped": int(
                    sum(len(set(x) ^ set(y)) // 2 for x, y in zip(ref_top, got_top, strict=True))
                ),
                "margin_at_flips": sorted(float(m) for m in margin[flipped])[:20],
                "margin_quantiles": {q: float(np.quantile(margin, q)) for q in (0.001, 0.01, 0.05, 0.5)},
            }
        out["layers"].append(layer)
        i += 1
    if top_k:
        out["positions_with_a_flip"] = int(flipped_any.sum())
        out["max_abs_at_flipped_positions"] = (
            float(per_position[flipped_any].max()) if flipped_any.any() else None
        )
        out["max_abs_at_unflipped_positions"] = (
            float(per_position[~flipped_any].max()) if (~flipped_any).any() else None
        )
        # an error reaches later positions through attention: the first flipped position of each prompt on
        before = [0.0]
        for s, n in zip(starts, prompt_lengths, strict=True):
            hit = np.nonzero(flipped_any[s : s + n])[0]
            clean = int(hit[0]) if hit.size else n  # positions of this prompt before its first flip
            if clean:
                before.append(float(per_position[s : s + clean].max()))
        out["max_abs_before_first_flip"] = max(before)
    return out


class References:
    """The CPU fp32 PyTorch reference of one model at a time (the slice's logits are ~0.3 GB)."""

    def __init__(self, work: Path):
        self.work, self.model, self.arrays = work, None, None

    def __call__(self, model: str) -> dict:
        if self.model != model:
            self.arrays = None
            with np.load(self.work / f"ref-{model}-cpu-fp32.npz") as f:
                self.arrays, self.model = dict(f), model
        return self.arrays


def _top_k(model: str) -> int | None:
    from qwen3_compile.models.presets import get_preset

    preset, layers = MODELS[model]
    arch = get_preset(preset, layers).arch
    return arch.top_k if arch.is_moe else None


def diag_one(work: Path, name: str, config: tuple, refs: References, cpu_logits: dict) -> dict:
    spec = ARTIFACTS[name]
    device = config[0]
    prompts = json.loads((work / f"probes-{spec.model}.json").read_text())
    got = ort_capture(work / name, prompts, *config)
    result = compare(refs(spec.model), got, _top_k(spec.model), [len(p) for p in prompts])
    if device == "cpu":
        cpu_logits[name] = got["logits"]
    elif name in cpu_logits:
        diff = np.abs(cpu_logits[name] - got["logits"])
        result["vs_ort_cpu_max_abs"] = float(diff.max())
        result["vs_ort_cpu_mean_abs"] = float(diff.mean())
    return result


def diag_torch(work: Path, model: str, variant: str, refs: References) -> dict:
    prompts = json.loads((work / f"probes-{model}.json").read_text())
    with np.load(work / f"ref-{model}-{variant}.npz") as f:
        got = dict(f)
    return compare(refs(model), got, _top_k(model), [len(p) for p in prompts])


def diag(work: Path, results: Results, artifacts: list[str], configs: list[str], tag: str = "") -> None:
    refs = References(work)
    for model in sorted({ARTIFACTS[a].model for a in artifacts}, key=lambda m: m != "slice"):
        # PyTorch's own variants first: what fp16 and TF32 do to the reference itself
        for variant in TORCH_VARIANTS[1:] if not tag else ():
            guarded(results, ["diag", f"torch-{model}", variant], diag_torch, work, model, variant, refs)
        for name in [a for a in artifacts if ARTIFACTS[a].model == model]:
            cpu_logits: dict = {}
            for config in configs:
                if ARTIFACTS[name].dtype == "bf16" and ORT_CONFIGS[config][0] == "cpu":
                    continue
                key = config + tag
                guarded(
                    results, ["diag", name, key], diag_one, work, name, ORT_CONFIGS[config], refs, cpu_logits
                )


# ---------------------------------------------------------------- bench


BENCH_PROMPT = np.random.default_rng(1).integers(0, 151643, 128).tolist()


def _bench_runner(
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
    runner = _bench_runner(work, name, ort_ops, backend, static_cache, cuda_graph)
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
        runner = _bench_runner(work, name, ort_ops)
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

    runner = _bench_runner(work, name, ort_ops, "ort-cuda", static_cache, cuda_graph)
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
    by_kernel = _kernel_times(prof)
    # the profiled window also holds the prefill's kernels: subtract a profiled prefill alone
    with profile(activities=[ProfilerActivity.CUDA]) as prefill_prof:
        decode(0)
    for kernel, us in _kernel_times(prefill_prof).items():
        if kernel in by_kernel:
            by_kernel[kernel] -= us
    per_step = {k: v / steps for k, v in by_kernel.items() if v > 0}
    return {
        "steps": steps,
        "ms_per_token_wall": round(1000 * wall_plain / steps, 3),
        "ms_per_token_wall_profiled": round(1000 * wall / steps, 3),
        **_kernel_summary(per_step, "per_token"),
    }


def _kernel_times(prof) -> dict[str, float]:
    """Device microseconds by kernel name over a torch.profiler window."""
    by_kernel: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if device_us:
            by_kernel[event.key] = by_kernel.get(event.key, 0.0) + device_us
    return by_kernel


def _kernel_summary(us_by_kernel: dict[str, float], unit: str) -> dict:
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

    runner = _bench_runner(work, name, ort_ops, "ort-cuda", static_cache, False)
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
        **_kernel_summary(_kernel_times(prof), "per_prefill"),
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


# ---------------------------------------------------------------- same-method decode loop (steps)


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
    runner = _bench_runner(work, name, ort_ops, "ort-cuda", static_cache, True)
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
    by_kernel = _kernel_times(prof)
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


# ---------------------------------------------------------------- validate


REPO = Path(__file__).resolve().parents[1]


def validate_tiny(work: Path, results: Results, out: Path, artifacts: list[str]) -> None:
    """The CLI, as a user runs it, several at once (3 CPU threads each for the PyTorch reference). They
    run in this checkout (`python -m` puts the working directory first on the path)."""
    procs = {}
    env = os.environ | {"OMP_NUM_THREADS": "3"}
    for name in artifacts:
        spec = ARTIFACTS[name]
        cmd = [sys.executable, "-m", "qwen3_compile.cli", "validate", str(work / name), "--reference"]
        cmd += [spec.preset, "--backend", "ort-cuda", "--json", "--force"]
        cmd += ["-o", str(work / f"validation-{name}")]
        log("launch", " ".join(cmd))
        procs[name] = (
            cmd,
            time.perf_counter(),
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
    for name, (cmd, start, proc) in procs.items():
        stdout, stderr = proc.communicate()
        entry = {
            "command": " ".join(cmd).replace(str(work), "W"),
            "exit_code": proc.returncode,
            "seconds": round(time.perf_counter() - start, 1),
        }
        try:
            report = json.loads(stdout)
            entry |= {k: report[k] for k in ("passed", "failures", "summary", "gates", "backend_settings")}
            entry["bisection"] = report.get("bisection")
        except Exception:
            entry["stdout"] = stdout[-2000:]
        entry["stderr_tail"] = stderr[-1500:]
        results.put(["validate", name], entry)
        log("validate", name, entry["exit_code"], entry.get("passed"))
    cmd = [sys.executable, "-m", "qwen3_compile.cli", "run", str(work / "tiny-moe-fp16"), "--prompt"]
    cmd += ["Explain in two sentences why the sky is blue.", "--backend", "ort-cuda", "--greedy"]
    cmd += ["--max-new-tokens", "64", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    entry = {"command": " ".join(cmd).replace(str(work), "W"), "exit_code": proc.returncode}
    try:
        entry |= {k: v for k, v in json.loads(proc.stdout).items() if k not in ("reasoning", "content")}
    except Exception:
        entry["stdout"] = proc.stdout[-1500:]
    entry["stderr_tail"] = proc.stderr[-1500:]
    results.put(["run-cli", "tiny-moe-fp16"], entry)


def validate_one(work: Path, name: str, loaded, long_tokens: int) -> dict:
    from qwen3_compile.validate.stage import validate_artifact

    report = validate_artifact(
        work / name,
        loaded,
        backend="ort-cuda",
        long_context_tokens=long_tokens,
        output=work / f"validation-{name}",
        force=True,  # a re-measure replaces the earlier report
    )
    data = report.to_dict()
    return {k: data[k] for k in ("passed", "failures", "summary", "gates", "backend_settings", "bisection")}


def validate_slice(work: Path, results: Results, artifacts: list[str], long_tokens: int) -> None:
    from qwen3_compile.models.loading import load_model

    loaded = load_model(SLICE, num_layers=2)
    for name in artifacts:
        guarded(results, ["validate", name], validate_one, work, name, loaded, long_tokens)


def matrix_paths(name: str, ort_ops: Path | None) -> list[tuple[str, Path | None]]:
    """How `validate-matrix` runs an artifact: (label, custom-op library or None). A MoE graph that keeps
    ExpertDispatch runs twice: ORT's inlined function body (dense experts) and our custom op."""
    spec = ARTIFACTS[name]
    if spec.lowered_from is not None:
        return [(spec.moe_lowering or "lowered", None)]
    if "moe" in spec.preset or spec.preset == SLICE:
        return [("body", None)] + ([("custom-op", ort_ops)] if ort_ops is not None else [])
    return [("dense", None)]


def validate_matrix(
    work: Path, results: Results, artifacts: list[str], ort_ops: Path | None, long_tokens: int
):
    """GPU parity: `validate --backend ort-cuda --reference-device cuda` (the fp32 PyTorch reference on the
    same GPU, TF32 off; each model's reference loaded once, its greedy runs reused across artifacts) of every
    artifact through each of its MoE paths, the dtype's default gates, both reasoning modes."""
    import torch

    from qwen3_compile.backends.onnxruntime.op_libraries import selected_custom_ops
    from qwen3_compile.backends.torch_reference import require_reference_device
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.validate.stage import validate_artifact

    require_reference_device("cuda")
    for model in dict.fromkeys(ARTIFACTS[a].model for a in artifacts):
        preset, layers = MODELS[model]
        start = time.perf_counter()
        loaded = load_model(preset, num_layers=layers, device="cuda")
        log("reference on cuda", model, round(time.perf_counter() - start, 1))
        for name in [a for a in artifacts if ARTIFACTS[a].model == model]:
            for label, ops in matrix_paths(name, ort_ops):

                def one(name=name, label=label, ops=ops, loaded=loaded) -> dict:
                    began = time.perf_counter()
                    with selected_custom_ops(ops, "ort-cuda"):
                        report = validate_artifact(
                            work / name,
                            loaded,
                            backend="ort-cuda",
                            long_context_tokens=long_tokens,
                            output=work / f"validation-{name}-{label}",
                            force=True,
                        )
                    data = report.to_dict()
                    keep = (
                        "passed",
                        "failures",
                        "summary",
                        "gates",
                        "reference_device",
                        "modes",
                        "bisection",
                    )
                    return {k: data[k] for k in keep} | {
                        "seconds": round(time.perf_counter() - began, 1),
                        "custom_ops": data["backend_settings"].get("custom_ops"),
                    }

                guarded(results, ["validate-matrix", name, label], one)
                log(
                    "validate-matrix", name, label, results.data["validate-matrix"][name][label].get("passed")
                )
        del loaded
        torch.cuda.empty_cache()


def torch_floor(results: Results, models: list[str], long_tokens: int, steps: int = 16) -> None:
    """torch-floor part: PyTorch's own fp16 and bf16 models on the GPU held to what validate holds an
    artifact to (the same prompt suite in both modes, the long-context case, metrics and default gates of
    the dtype) against the same fp32 reference on the GPU: the floor a framework's own half-precision run
    sets, beside the artifacts' rows of validate-matrix. Uses validate's own case runner and gate check."""
    import dataclasses

    import torch

    from qwen3_compile.backends.torch_reference import TorchRunner, require_reference_device
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.tokenizer import load_tokenizer
    from qwen3_compile.validate.gates import DEFAULT_GATES
    from qwen3_compile.validate.prompt_suite import load_prompt_entries, long_context_case, render_suite
    from qwen3_compile.validate.stage import ValidationReport, _evaluate, _run_case

    require_reference_device("cuda")
    tokenizer = load_tokenizer()
    cases = render_suite(tokenizer, load_prompt_entries(None)) + [long_context_case(tokenizer, long_tokens)]
    for model in models:
        preset, layers = MODELS[model]
        reference = TorchRunner(load_model(preset, num_layers=layers, device="cuda"))
        for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):

            def one(dtype=dtype, torch_dtype=torch_dtype, preset=preset, layers=layers, reference=reference):
                low = load_model(preset, num_layers=layers, dtype=torch_dtype, device="cuda")
                ran = [_run_case(reference, TorchRunner(low), case, steps) for case in cases]
                report = ValidationReport(
                    f"pytorch-{dtype}", preset, "pytorch-cuda", DEFAULT_GATES[dtype], "defaults", ran, None
                )
                report = dataclasses.replace(report, failures=_evaluate(report))
                data = report.to_dict()
                del low
                torch.cuda.empty_cache()
                return {k: data[k] for k in ("passed", "failures", "summary", "gates", "modes")}

            guarded(results, ["torch-floor", model, dtype], one)
        del reference
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- main


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
