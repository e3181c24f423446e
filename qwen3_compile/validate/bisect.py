"""Layer bisection: each decoder layer's output in the artifact against the reference, to name the first
layer where the artifact diverges.

The exporter names every layer's output `layers.{i}/residual_mlp/out` (graph.layer_output_name); the
artifact is re-run with those tensors marked as graph outputs through Polygraphy's loaders and ONNX
Runtime runner. The reference side records the same tensors with forward hooks on transformers' layers.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3_compile.export.graph import layer_output_name, past_names
from qwen3_compile.models.loading import LoadedModel
from qwen3_compile.runtime.ort_settings import manifest_session_options


@dataclass(frozen=True)
class Bisection:
    tolerance: float
    # relative Frobenius error of each layer's output over the probed positions
    layer_errors: list[float]
    first_diverging_layer: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def reference_layer_outputs(loaded: LoadedModel, prompts: list[list[int]]) -> list[np.ndarray]:
    """[layer] -> concatenated [positions, H] outputs over all prompts."""
    captured: dict[int, list[np.ndarray]] = {}
    layers = loaded.model.model.layers

    def hook(index):
        def record(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured.setdefault(index, []).append(hidden[0].detach().float().numpy())

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ids in prompts:
                loaded.model(torch.tensor([ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [np.concatenate(captured[i]) for i in range(len(layers))]


def artifact_layer_outputs(
    model_path: Path, num_layers: int, prompts: list[list[int]], manifest: dict
) -> list[np.ndarray]:
    """Each layer's output on ORT, the session set up as the manifest records (runtime/ort_settings.py)."""
    import onnxruntime as ort
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath, SaveOnnx
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # its per-step INFO lines would drown our progress output

    names = [layer_output_name(i) for i in range(num_layers)]
    with tempfile.TemporaryDirectory() as tmp:
        marked = Path(tmp) / "model.onnx"
        large = sum(p.stat().st_size for p in model_path.parent.glob("model.onnx*")) > 1_800_000_000
        SaveOnnx(
            ModifyOutputs(OnnxFromPath(str(model_path)), outputs=names),
            str(marked),
            external_data_path="model.onnx.data" if large else None,
        )()
        session = ort.InferenceSession(
            str(marked), manifest_session_options(manifest), providers=["CPUExecutionProvider"]
        )
        runner = OnnxrtRunner(session)
        outputs: list[list[np.ndarray]] = [[] for _ in names]
        with runner:
            past = runner.get_input_metadata(use_numpy_dtypes=False)[past_names(0)[0]]
            empty = np.zeros((1, past.shape[1], 0, past.shape[3]), dtype=past.dtype.numpy())
            for ids in prompts:
                n = len(ids)
                feeds = {
                    "input_ids": np.array([ids], dtype=np.int64),
                    "attention_mask": np.ones((1, n), dtype=np.int64),
                    "position_ids": np.arange(n, dtype=np.int64)[None],
                }
                feeds |= {name: empty for i in range(num_layers) for name in past_names(i)}
                result = runner.infer(feeds)
                for i, name in enumerate(names):
                    outputs[i].append(np.asarray(result[name], dtype=np.float32)[0])
    return [np.concatenate(o) for o in outputs]


def bisect_layers(
    loaded: LoadedModel, model_path: Path, prompts: list[list[int]], tolerance: float, manifest: dict
) -> Bisection:
    reference = reference_layer_outputs(loaded, prompts)
    artifact = artifact_layer_outputs(model_path, len(reference), prompts, manifest)
    errors = [
        float(np.linalg.norm(a - r) / (np.linalg.norm(r) + 1e-30))
        for r, a in zip(reference, artifact, strict=True)
    ]
    first = next((i for i, e in enumerate(errors) if e > tolerance), None)
    return Bisection(tolerance, errors, first)
