"""ONNX Runtime runner for exported graphs (past/present KV cache, optimum-style I/O)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3_compile.export.graph import past_names, present_names
from qwen3_compile.runtime.base import empty_kv_cache, graph_feeds

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtRunner:
    def __init__(
        self,
        model_path: str | Path,
        optimization: str = "all",
        threads: int | None = None,
        providers: list[str] | None = None,
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model_path), options, providers=providers or ["CPUExecutionProvider"]
        )
        self.name = f"onnxruntime:{Path(model_path).parent.name}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        past = inputs[past_names(0)[0]]
        self.kv_heads, self.head_dim = past.shape[1], past.shape[3]
        self.kv_dtype = _NUMPY_TYPES[past.type]
        self.outputs = ["logits"] + [n for i in range(self.num_layers) for n in present_names(i)]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return empty_kv_cache(batch, self.num_layers, self.kv_heads, self.head_dim, self.kv_dtype)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = graph_feeds(input_ids, attention_mask, position_ids, cache)
        logits, *present = self.session.run(self.outputs, feeds)
        return logits, present
