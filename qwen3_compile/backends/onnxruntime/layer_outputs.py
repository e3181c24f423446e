"""Every decoder layer's output of an ONNX artifact on ONNX Runtime, for layer bisection: the layers' output
tensors (`layers.{i}/residual_mlp/out`) are marked as graph outputs through Polygraphy's loaders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from qwen3_compile.backends.onnxruntime.settings import manifest_session_options
from qwen3_compile.graph_contract import layer_output_name, past_names


def artifact_layer_outputs(
    model_path: Path, num_layers: int, prompts: list[list[int]], manifest: dict
) -> list[np.ndarray]:
    """Each layer's output on ORT, its session set up as the manifest records (settings.py)."""
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
