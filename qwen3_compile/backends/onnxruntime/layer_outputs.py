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
from onnx import TensorProto

from qwen3_compile.backends.onnxruntime.op_libraries import custom_op_libraries
from qwen3_compile.backends.onnxruntime.settings import empty_past, manifest_session_options, open_session
from qwen3_compile.graph_contract import layer_output_name

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
    """A session on the artifact's graph whose outputs are `names` (any tensors of the graph) cast to fp32,
    each named `{name}/fp32` (numpy has no bf16)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    del model.graph.output[:]
    for name in names:
        model.graph.node.append(onnx.helper.make_node("Cast", [name], [f"{name}/fp32"], to=TensorProto.FLOAT))
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(f"{name}/fp32", TensorProto.FLOAT, None) for name in names
    )
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(Path(model_path).parent.resolve()))
    libraries = custom_op_libraries(device)  # the ort-cuda backend's libraries ($QWEN3_COMPILE_ORT_OPS)
    return open_session(
        model.SerializeToString(), options, model_path, device, cuda_options=cuda_options, libraries=libraries
    )


def artifact_tensors(
    model_path: Path,
    names: list[str],
    prompts: list[list[int]],
    manifest: dict,
    device: str = "cpu",
    cuda_options: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """The named tensors of a prefill of each prompt (batch 1, no past), as fp32, concatenated over the
    prompts along the positions ([1, S, ...] tensors lose the batch axis; [S, ...] ones keep their shape).
    Fed through IO binding, so graphs with a bf16 KV cache work too (where the device runs them)."""

    session = marked_session(model_path, names, manifest_session_options(manifest), device, cuda_options)
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for ids in prompts:
        n = len(ids)
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([ids], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, n), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(n, dtype=np.int64)[None])
        for past in pasts:
            binding.bind_ortvalue_input(past.name, empty_past(1, past.shape[1], past.shape[3], past.type))
        for name in names:
            binding.bind_output(f"{name}/fp32", "cpu")
        session.run_with_iobinding(binding)
        for name, value in zip(names, binding.get_outputs(), strict=True):
            value = value.numpy()
            outputs[name].append(value[0] if value.ndim == 3 and value.shape[0] == 1 else value)
    return {name: np.concatenate(o) for name, o in outputs.items()}
