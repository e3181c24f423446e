"""prepare: the exports and PyTorch's reference captures on probe prompts (no ONNX Runtime GPU needed)."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import numpy as np

from ort_cuda_parts.artifacts import ARTIFACTS, MODELS, SLICE, TORCH_VARIANTS
from ort_cuda_parts.results import log


def probes(model: str) -> list[list[int]]:
    """The parity chat prompts in both modes and two random 128-token prompts (the first probe's shape);
    the validate runs cover the prompt suite."""
    from qwen3_compile.parity import parity_prompts
    from qwen3_compile.tokenizer import load_tokenizer

    ids, _ = parity_prompts(load_tokenizer())
    rng = np.random.default_rng(0)
    return ids + [rng.integers(0, 151643, 128).tolist() for _ in range(2)]


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
