"""The PyTorch reference runner: transformers' model with its own KV cache."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.loading import LoadedModel


def cache_argument(model) -> str:
    """transformers >= 5.2x renamed `past_key_values` to `cache`; whichever this version's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


REFERENCE_DEVICES = ("cpu", "cuda")


def require_reference_device(device: str) -> None:
    """Refuse a reference device this machine lacks; on CUDA, keep fp32 matmuls in fp32 (TF32 off: TF32
    moves router logits enough to flip near-tied experts, docs/gpu.md)."""
    if device not in REFERENCE_DEVICES:
        raise BadInputError(
            f"unknown reference device {device!r}.",
            field="--reference-device",
            fix=f"use one of {', '.join(REFERENCE_DEVICES)}.",
        )
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(
                "the PyTorch reference was asked to run on CUDA, but this torch build sees no CUDA GPU.",
                field="--reference-device",
                fix="run on a machine with a CUDA GPU and a CUDA build of torch, or use --reference-device "
                "cpu.",
            )
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def model_device(model) -> torch.device:
    """Where the reference's weights live (validate --reference-device): inputs go there, outputs back."""
    return next(model.parameters()).device


class TorchRunner:
    name = "pytorch"

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.cache_arg = cache_argument(self.model)
        self.device = model_device(self.model)

    def empty_cache(self, batch: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, Any]:
        out = self.model(
            input_ids=torch.from_numpy(input_ids).to(self.device),
            attention_mask=torch.from_numpy(attention_mask).to(self.device),
            position_ids=torch.from_numpy(position_ids).to(self.device),
            use_cache=True,
            **{self.cache_arg: cache},
        )
        return out.logits.float().cpu().numpy(), cache
