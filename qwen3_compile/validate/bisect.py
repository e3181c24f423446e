"""Layer bisection: each decoder layer's output in the artifact against the reference, to name the first
layer where the artifact diverges.

The exporter names every layer's output `layers.{i}/residual_mlp/out` (graph.layer_output_name); the
artifact is re-run with those tensors marked as graph outputs through Polygraphy's loaders and ONNX
Runtime runner. The reference side records the same tensors with forward hooks on transformers' layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3_compile.backends.onnxruntime.layer_outputs import artifact_layer_outputs
from qwen3_compile.models.loading import LoadedModel


@dataclass(frozen=True)
class Bisection:
    tolerance: float
    # relative Frobenius error of each layer's output over the probed positions
    layer_errors: list[float]
    first_diverging_layer: int | None
    # per-layer tolerances where they differ by layer (fp16 recipe check: a multiple of each layer's floor);
    # `tolerance` is then their largest
    layer_tolerances: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def reference_layer_outputs(
    loaded: LoadedModel, prompts: list[list[int]], cache_factory: Callable[[], object] | None = None
) -> list[np.ndarray]:
    """[layer] -> concatenated [positions, H] outputs over all prompts. `cache_factory`: a cache to run
    through (a quantizing KV cache changes the attention's keys and values), else none."""
    from qwen3_compile.backends.torch_reference import cache_argument, model_device

    captured: dict[int, list[np.ndarray]] = {}
    layers = loaded.model.model.layers

    def hook(index):
        def record(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured.setdefault(index, []).append(hidden[0].detach().float().cpu().numpy())

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = model_device(loaded.model)
    try:
        with torch.no_grad():
            for ids in prompts:
                if cache_factory is None:
                    loaded.model(torch.tensor([ids], device=device), use_cache=False)
                else:
                    cache = {cache_argument(loaded.model): cache_factory()}
                    loaded.model(torch.tensor([ids], device=device), use_cache=True, **cache)
    finally:
        for handle in handles:
            handle.remove()
    return [np.concatenate(captured[i]) for i in range(len(layers))]


def bisect_layers(
    loaded: LoadedModel,
    model_path: Path,
    prompts: list[list[int]],
    tolerance: float | list[float],
    manifest: dict,
    device: str = "cpu",
    cache_factory: Callable[[], object] | None = None,
    reference: list[np.ndarray] | None = None,
) -> Bisection:
    """`device`: where ONNX Runtime runs the artifact (the validated backend's: cpu or cuda). `tolerance`:
    one for every layer, or one per layer. `reference`: `loaded`'s layer outputs on `prompts`, where the
    caller already has them."""
    if reference is None:
        reference = reference_layer_outputs(loaded, prompts, cache_factory)
    artifact = artifact_layer_outputs(model_path, len(reference), prompts, manifest, device)
    errors = relative_errors(reference, artifact)
    per_layer = list(tolerance) if isinstance(tolerance, (list, tuple)) else None
    limits = per_layer or [tolerance] * len(errors)
    first = next((i for i, (e, t) in enumerate(zip(errors, limits, strict=True)) if e > t), None)
    return Bisection(max(limits), errors, first, per_layer)


def relative_errors(reference: list[np.ndarray], other: list[np.ndarray]) -> list[float]:
    """Per layer, the relative Frobenius error of `other`'s outputs against `reference`'s."""
    return [
        float(np.linalg.norm(a - r) / (np.linalg.norm(r) + 1e-30))
        for r, a in zip(reference, other, strict=True)
    ]
