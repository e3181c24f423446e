"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

Per input channel j of the projections that read an RMSNorm's output:
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); the norm weight becomes w / s (so X becomes X / s) and each
reading projection's weights W * s along the input axis. The float model is unchanged up to rounding;
per-tensor activation ranges shrink where a few channels dominated. Groups (per layer):
input_layernorm -> q/k/v_proj; post_attention_layernorm -> gate/up_proj, or every expert's gate_up_proj
and the (unquantized, fp32) router, which must see the same X.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.quantize.calibrate import CalibrationStats
from qwen3_compile.quantize.recipe import QuantRecipe
from qwen3_compile.quantize.weight_store import WeightStore
from qwen3_compile.quantize.weights import Transform, checkpoint_name


@dataclass(frozen=True)
class SmoothGroup:
    norm: str  # RMSNorm weight initializer
    readers: tuple[str, ...]  # initializers whose input axis is scaled; their stats are X's ranges
    compensated: tuple[str, ...] = ()  # read X too but are not quantized (the router): scaled, not measured


def smooth_groups(arch: Qwen3Arch, layer: int) -> list[SmoothGroup]:
    p = f"model.layers.{layer}."
    mlp = (
        SmoothGroup(
            p + "post_attention_layernorm.weight",
            (p + "mlp.experts.gate_up_proj",),
            (p + "mlp.gate.weight.T",),
        )
        if arch.is_moe
        else SmoothGroup(
            p + "post_attention_layernorm.weight", (p + "mlp.gate_proj.weight.T", p + "mlp.up_proj.weight.T")
        )
    )
    attn = SmoothGroup(p + "input_layernorm.weight", tuple(p + f"self_attn.{n}_proj.weight.T" for n in "qkv"))
    return [attn, mlp]


def _input_axis_absmax(weights: np.ndarray) -> np.ndarray:
    """|W| max per input channel: [in, out] linear (axis 0) or [E, rows, in] experts (last axis, one
    expert at a time)."""
    if weights.ndim == 2:
        return np.abs(weights).max(axis=1)
    return np.max([np.abs(expert).max(axis=0) for expert in weights], axis=0)


def _scale_input_axis(weights: np.ndarray, s: np.ndarray) -> np.ndarray:
    """weights * s along the input axis, computed in float64 and stored in the weights' own type (stacked
    experts one at a time, so the float64 temporary is one expert's)."""
    if weights.ndim == 2:
        return (weights.astype(np.float64) * s[:, None]).astype(weights.dtype)
    out = np.empty(weights.shape, weights.dtype)
    for e, expert in enumerate(weights):
        out[e] = expert.astype(np.float64) * s
    return out


def smoothing_scales(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(act_amax, alpha) / np.power(weight_amax, 1.0 - alpha)
    valid = (act_amax > 0) & (weight_amax > 0) & np.isfinite(s)
    return np.where(valid, np.maximum(s, 1e-5), 1.0)


def smoothquant_transforms(
    store: WeightStore, arch: Qwen3Arch, recipe: QuantRecipe, stats: CalibrationStats
) -> tuple[dict[str, Transform], dict[str, dict]]:
    """Smoothing scales per group (weights read one at a time), as value transforms for
    `quantize_weights`: norm / s, readers * s along their input axis. `stats` ranges become those of
    X / s and `stats.smoothing` keeps each s. Returns the transforms and per-group summaries."""
    alpha = recipe.smoothquant.alpha
    transforms: dict[str, Transform] = {}
    summary = {}
    for layer in range(arch.num_layers):
        for group in smooth_groups(arch, layer):
            names = [checkpoint_name(r) for r in group.readers]
            if not all(recipe.select.selects(n) for n in names):
                continue
            act = np.max([stats.act_amax(n) for n in names], axis=0)
            w_amax = np.max([_input_axis_absmax(store.array(r)) for r in group.readers], axis=0)
            s = smoothing_scales(act, w_amax.astype(np.float64), alpha)
            transforms |= group_transforms(group, s)
            for n in names:
                stats.layers[layer].act_amax[n] = stats.act_amax(n) / s
            stats.smoothing[group.norm] = s
            summary[group.norm] = {"max_scale": float(s.max()), "median_scale": float(np.median(s))}
    return transforms, summary


def group_transforms(group: SmoothGroup, s: np.ndarray) -> dict[str, Transform]:
    """The folds of one group's scales: the norm / s, its readers (and the router) * s."""
    transforms: dict[str, Transform] = {group.norm: partial(_divide, s=s)}
    for name in group.readers + group.compensated:
        transforms[name] = partial(_scale_input_axis, s=s)
    return transforms


def recorded_transforms(arch: Qwen3Arch, smoothing: dict[str, np.ndarray]) -> dict[str, Transform]:
    """The transforms of an artifact's recorded scales (calibration.safetensors `smoothquant/<norm>`)."""
    transforms: dict[str, Transform] = {}
    for layer in range(arch.num_layers):
        for group in smooth_groups(arch, layer):
            if group.norm in smoothing:
                transforms |= group_transforms(group, smoothing[group.norm])
    return transforms


def _divide(values: np.ndarray, s: np.ndarray) -> np.ndarray:
    return (values.astype(np.float64) / s).astype(values.dtype)
