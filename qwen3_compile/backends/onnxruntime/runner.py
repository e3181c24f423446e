"""ONNX Runtime runner for exported graphs (past/present KV cache, optimum-style I/O), on the CPU or CUDA.

Two ways to feed the session:
- plain `session.run` (the CPU default): numpy in, numpy out; the KV cache is a list of numpy arrays.
- IO binding (always on CUDA; optional on the CPU, where the tests exercise it): the KV cache is a list of
  OrtValues that stay where ORT wrote them (GPU memory on CUDA) and are bound as the next step's past, so no
  cache byte crosses to the host. Per step only the ids, mask and positions go in (a few int64s at decode)
  and the logits come out (bound to host memory: the caller picks the next token from them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3_compile.backends.base import empty_kv_cache, graph_feeds
from qwen3_compile.backends.onnxruntime.op_libraries import custom_op_libraries
from qwen3_compile.backends.onnxruntime.settings import empty_past, open_session, session_options
from qwen3_compile.graph_contract import past_names, present_names

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_IDS = ("input_ids", "attention_mask", "position_ids")


class OrtRunner:
    def __init__(
        self,
        model_path: str | Path,
        optimization: str = "all",
        threads: int | None = None,
        providers: list | None = None,
        session_config: dict[str, str] | None = None,
        device: str = "cpu",
        io_binding: bool | None = None,
        cuda_options: dict[str, str] | None = None,
        custom_ops: list | tuple | None = None,
    ):
        """`optimization` and `session_config`: what the artifact's manifest records (settings.py).
        `device`: "cpu" or "cuda" (settings.execution_providers; `providers` overrides it). `io_binding`:
        keep the KV cache in the session's device memory between calls (default: on for CUDA).
        `custom_ops`: ORT custom-op libraries for a CUDA session (default: $QWEN3_COMPILE_ORT_OPS;
        op_libraries.py)."""

        options = session_options(optimization, session_config, threads)
        self.custom_ops = custom_op_libraries(device, custom_ops)
        self.device = device
        self.session = open_session(
            str(model_path), options, model_path, device, providers, cuda_options, self.custom_ops
        )
        self.name = f"onnxruntime{'-cuda' if device == 'cuda' else ''}:{Path(model_path).parent.name}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        past = inputs[past_names(0)[0]]
        self.kv_heads, self.head_dim = past.shape[1], past.shape[3]
        self.kv_type = past.type
        self.kv_dtype = _NUMPY_TYPES.get(past.type)  # None for bf16 (numpy has none): IO binding only
        self.past = [n for i in range(self.num_layers) for n in past_names(i)]
        self.present = [n for i in range(self.num_layers) for n in present_names(i)]
        self.outputs = ["logits"] + self.present
        self.io_binding = device != "cpu" if io_binding is None else io_binding
        if not self.io_binding and self.kv_dtype is None:
            raise ValueError(f"a {past.type} KV cache needs io_binding=True (numpy has no such dtype)")

    @property
    def provider_options(self) -> dict[str, dict[str, str]]:
        """What the session runs with, as ORT reports it (the validation report records it)."""
        return self.session.get_provider_options()

    def empty_cache(self, batch: int) -> list:
        if not self.io_binding:
            return empty_kv_cache(batch, self.num_layers, self.kv_heads, self.head_dim, self.kv_dtype)
        return [empty_past(batch, self.kv_heads, self.head_dim, self.kv_type)] * (2 * self.num_layers)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: list,
    ) -> tuple[np.ndarray, list]:
        if self.io_binding:
            return self._forward_bound(input_ids, attention_mask, position_ids, cache)
        feeds = graph_feeds(input_ids, attention_mask, position_ids, cache)
        logits, *present = self.session.run(self.outputs, feeds)
        return logits, present

    def _forward_bound(self, input_ids, attention_mask, position_ids, cache) -> tuple[np.ndarray, list]:
        """One call through IO binding: the past OrtValues are bound where they live, the presents are
        allocated by ORT on the device and returned as the next cache, the logits are bound to the host."""
        binding = self.session.io_binding()
        host = [np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids)]
        for name, array in zip(_IDS, host, strict=True):
            binding.bind_cpu_input(name, array)  # copied to the device by ORT (a few bytes at decode)
        for name, value in zip(self.past, cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present
