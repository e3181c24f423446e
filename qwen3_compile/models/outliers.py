"""Massive activation channels, as trained LLMs have them, added to a model without changing its function.

A few channels of every RMSNorm weight are multiplied by `scale` and the matching input columns of each
projection reading that norm (q/k/v, gate/up or the experts and the router) divided by it: the float
model computes the same logits, but the quantized linear inputs now carry channels `scale` times larger
than the rest. That is the case per-tensor W8A8 handles badly and SmoothQuant was made for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen3_compile.models.config import Qwen3Arch


@dataclass(frozen=True)
class ActivationOutliers:
    channels: tuple[int, ...] = (3, 17, 42)
    scale: float = 60.0


def _readers(arch: Qwen3Arch, layer: int) -> dict[str, list[str]]:
    p = f"model.layers.{layer}."
    mlp = (
        ["mlp.experts.gate_up_proj", "mlp.gate.weight"]
        if arch.is_moe
        else ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    )
    return {
        p + "input_layernorm.weight": [p + f"self_attn.{n}_proj.weight" for n in "qkv"],
        p + "post_attention_layernorm.weight": [p + m for m in mlp],
    }


def _roles(arch: Qwen3Arch) -> dict[str, str]:
    """tensor name -> 'norm' or 'reader'."""
    roles = {}
    for layer in range(arch.num_layers):
        for norm, readers in _readers(arch, layer).items():
            roles[norm] = "norm"
            roles.update(dict.fromkeys(readers, "reader"))
    return roles


@torch.no_grad()
def with_outliers(
    arch: Qwen3Arch, name: str, tensor: torch.Tensor, outliers: ActivationOutliers
) -> torch.Tensor:
    """One tensor (transformers layout, experts fused [E, 2I, H]) of the outlier model, in place."""
    role = _roles(arch).get(name)
    if role == "norm":
        tensor[list(outliers.channels)] *= outliers.scale
    elif role == "reader":  # the input axis is the last one for linear and fused expert weights
        tensor[..., list(outliers.channels)] /= outliers.scale
    return tensor
