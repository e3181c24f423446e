"""ONNX Runtime runner for exported graphs (past/present KV cache, optimum-style I/O)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3_compile.backends.base import empty_kv_cache, graph_feeds
from qwen3_compile.backends.onnxruntime.settings import session_options
from qwen3_compile.graph_contract import past_names, present_names

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtRunner:
    def __init__(
        self,
        model_path: str | Path,
        optimization: str = "all",
        threads: int | None = None,
        providers: list[str] | None = None,
        session_config: dict[str, str] | None = None,
    ):
        """`optimization` and `session_config`: what the artifact's manifest records (ort_settings.py)."""
        import onnxruntime as ort

        options = session_options(optimization, session_config, threads)
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
