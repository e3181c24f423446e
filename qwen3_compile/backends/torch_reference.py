"""The PyTorch reference runner: transformers' model with its own KV cache."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qwen3_compile.models.loading import LoadedModel


def cache_argument(model) -> str:
    """transformers >= 5.2x renamed `past_key_values` to `cache`; whichever this version's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TorchRunner:
    name = "pytorch"

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.cache_arg = cache_argument(self.model)

    def empty_cache(self, batch: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, Any]:
        out = self.model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            position_ids=torch.from_numpy(position_ids),
            use_cache=True,
            **{self.cache_arg: cache},
        )
        return out.logits.float().numpy(), cache
