"""diag: the probes through ONNX Runtime's CPU and CUDA providers against the CPU fp32 reference (logits,
layers, router top-k choices and their margins)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ort_cuda_parts.artifacts import ARTIFACTS, MODELS, ORT_CONFIGS, TORCH_VARIANTS
from ort_cuda_parts.results import Results, guarded


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
