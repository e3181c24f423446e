"""Intermediate tensors of an ONNX artifact on ONNX Runtime, for layer bisection: every decoder layer's
output (`layers.{i}/residual_mlp/out`), or any named tensors (a MoE layer's router logits), marked as graph
outputs. The session runs on the device the validated backend runs on (`ort`: CPU, `ort-cuda`: CUDA), with
the artifact's recorded settings (settings.py).

The marked graph is the artifact's graph proto without its weights: ORT reads the weights from the
artifact's own external-data file (`session.model_external_initializers_file_folder_path`), so bisecting a
model of tens of GB copies none of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3_compile.backends.onnxruntime.settings import (
    check_session_device,
    execution_providers,
    manifest_session_options,
)
from qwen3_compile.graph_contract import layer_output_name, past_names

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def artifact_layer_outputs(
    model_path: Path, num_layers: int, prompts: list[list[int]], manifest: dict, device: str = "cpu"
) -> list[np.ndarray]:
    """Each layer's output on ORT, its session set up as the manifest records (settings.py)."""
    names = [layer_output_name(i) for i in range(num_layers)]
    found = artifact_tensors(model_path, names, prompts, manifest, device)
    return [found[name] for name in names]


def marked_session(
    model_path: Path, names: list[str], options, device: str = "cpu", cuda_options: dict | None = None
):
    """A session on the artifact's graph whose outputs are exactly `names` (any tensors of the graph)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)  # ORT infers the types
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(Path(model_path).parent.resolve()))
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=execution_providers(device, cuda_options)
    )
    check_session_device(session, device, model_path)
    return session


def artifact_tensors(
    model_path: Path,
    names: list[str],
    prompts: list[list[int]],
    manifest: dict,
    device: str = "cpu",
    cuda_options: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """The named tensors of a prefill of each prompt (batch 1, no past), as fp32, concatenated over the
    prompts along the positions ([1, S, ...] tensors lose the batch axis; [S, ...] ones keep their shape)."""
    session = marked_session(model_path, names, manifest_session_options(manifest), device, cuda_options)
    inputs = {i.name: i for i in session.get_inputs()}
    past = inputs[past_names(0)[0]]
    if past.type not in _NUMPY_TYPES:
        raise ValueError(f"intermediate tensors of a {past.type} KV-cache graph are not supported")
    empty = np.zeros((1, past.shape[1], 0, past.shape[3]), dtype=_NUMPY_TYPES[past.type])
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for ids in prompts:
        n = len(ids)
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
        }
        feeds |= {name: empty for name in inputs if name.startswith("past_key_values.")}
        for name, value in zip(names, session.run(names, feeds), strict=True):
            value = np.asarray(value, dtype=np.float32)
            outputs[name].append(value[0] if value.ndim == 3 and value.shape[0] == 1 else value)
    return {name: np.concatenate(o) for name, o in outputs.items()}
