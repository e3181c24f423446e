"""Every decoder layer's output of an ONNX artifact on ONNX Runtime, for layer bisection: the layers' output
tensors (`layers.{i}/residual_mlp/out`) are marked as graph outputs through Polygraphy's loaders. The
session runs on the device the validated backend runs on (`ort`: CPU, `ort-cuda`: CUDA), with the same
settings (settings.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from qwen3_compile.backends.onnxruntime.settings import (
    check_session_device,
    execution_providers,
    manifest_session_options,
)
from qwen3_compile.graph_contract import layer_output_name, past_names


def artifact_layer_outputs(
    model_path: Path, num_layers: int, prompts: list[list[int]], manifest: dict, device: str = "cpu"
) -> list[np.ndarray]:
    """Each layer's output on ORT, its session set up as the manifest records (settings.py)."""
    names = [layer_output_name(i) for i in range(num_layers)]
    found = artifact_tensors(model_path, names, num_layers, prompts, manifest, device)
    return [found[name] for name in names]


def artifact_tensors(
    model_path: Path,
    names: list[str],
    num_layers: int,
    prompts: list[list[int]],
    manifest: dict,
    device: str = "cpu",
    cuda_options: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """The named intermediate tensors of a prefill of each prompt (batch 1), as fp32, concatenated over
    the prompts along the first axis (positions for [1, S, ...] tensors, tokens for [S, ...] ones)."""
    import onnxruntime as ort
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath, SaveOnnx
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # its per-step INFO lines would drown our progress output

    with tempfile.TemporaryDirectory() as tmp:
        marked = Path(tmp) / "model.onnx"
        large = sum(p.stat().st_size for p in model_path.parent.glob("model.onnx*")) > 1_800_000_000
        SaveOnnx(
            ModifyOutputs(OnnxFromPath(str(model_path)), outputs=names),
            str(marked),
            external_data_path="model.onnx.data" if large else None,
        )()
        session = ort.InferenceSession(
            str(marked),
            manifest_session_options(manifest),
            providers=execution_providers(device, cuda_options),
        )
        check_session_device(session, device, model_path)
        runner = OnnxrtRunner(session)
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
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
                for name in names:
                    value = np.asarray(result[name], dtype=np.float32)
                    outputs[name].append(value[0] if value.shape[0] == 1 and value.ndim == 3 else value)
    return {name: np.concatenate(o) for name, o in outputs.items()}
