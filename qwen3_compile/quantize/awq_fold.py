"""AWQ's scales and clipping ratios as weight transforms (what `awq.AwqSearch` records, applied).

The projections that read X get W * s (input axis) and 1 / s goes into what produces X, so the float model
computes the same function: the RMSNorm weights (q/k/v; gate/up or the experts plus the float router),
v_proj's output rows (o_proj, s tied over each kv head's query heads under GQA) and up_proj's output rows
(down_proj, per expert for MoE). A clipping ratio clamps one (output channel, input group) of a scaled
weight to ratio x its max |w| before quantizing.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.quantize.weights import Transform


def clip_groups(values: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """A linear weight stored [in, out] with ratios [out, groups], or stacked experts [E, rows, in] with
    ratios [E, rows, groups]: each (output, group of inputs) clamped to ratio * its max |w|."""
    if values.ndim == 3:
        v = values.astype(np.float64).reshape(*values.shape[:2], ratios.shape[2], -1)  # [E, rows, groups, G]
        limit = np.abs(v).max(axis=-1, keepdims=True) * ratios[..., None]
        return np.clip(v, -limit, limit).reshape(values.shape).astype(values.dtype)
    groups = ratios.shape[1]
    v = values.astype(np.float64).reshape(groups, -1, values.shape[1])  # [groups, G, out]
    limit = np.abs(v).max(axis=1, keepdims=True) * ratios.T[:, None, :]
    return np.clip(v, -limit, limit).reshape(values.shape).astype(values.dtype)


def _scale_axis(values: np.ndarray, s: np.ndarray, axis: int, divide: bool = False) -> np.ndarray:
    """values * s (or / s) along `axis`, in float64, stored in the values' own type."""
    shape = [1] * values.ndim
    shape[axis] = -1
    s = s.reshape(shape)
    out = values.astype(np.float64)
    return (out / s if divide else out * s).astype(values.dtype)


def _experts_transform(values: np.ndarray, s_in: np.ndarray | None, s_rows: dict[int, np.ndarray]):
    """Stacked experts [E, rows, in]: every expert's input axis * s_in; expert e's last rows / s_rows[e]
    (gate_up: the up half)."""
    out = np.empty(values.shape, values.dtype)
    for e, expert in enumerate(values):
        x = expert.astype(np.float64)
        if s_in is not None:
            x = x * s_in
        if e in s_rows:
            x[-len(s_rows[e]) :] /= s_rows[e][:, None]
        out[e] = x
    return out


def _experts_transform_down(values: np.ndarray, s: dict[int, np.ndarray]) -> np.ndarray:
    """down_proj [E, H, I]: expert e's input axis * s[e]."""
    out = np.array(values, copy=True)
    for e, s_e in s.items():
        out[e] = (values[e].astype(np.float64) * s_e).astype(values.dtype)
    return out


def _compose(*steps: Transform) -> Transform:
    def run(values: np.ndarray) -> np.ndarray:
        for step in steps:
            values = step(values)
        return values

    return run


def clip_target(prefix: str, name: str) -> str:
    """The initializer a `clip/<name>` record applies to: `<name>.weight.T` for a linear weight, the stacked
    experts' own name (`mlp.experts.gate_up_proj`)."""
    return prefix + name if ".experts." in name else f"{prefix}{name}.weight.T"


def layer_transforms(arch: Qwen3Arch, index: int, scales: dict[str, np.ndarray]) -> dict[str, Transform]:
    """Layer `index`'s transforms by ONNX initializer (linear weights stored [in, out] as `<name>.T`)."""
    p = f"model.layers.{index}."
    t: dict[str, Transform] = {}
    attn, o, mlp = scales[p + "attn"], scales[p + "o"], scales[p + "mlp"]
    o_full = np.repeat(o.reshape(arch.num_kv_heads, 1, -1), arch.num_heads // arch.num_kv_heads, 1)
    t[p + "input_layernorm.weight"] = partial(_scale_axis, s=attn, axis=0, divide=True)
    for n in "qk":
        t[p + f"self_attn.{n}_proj.weight.T"] = partial(_scale_axis, s=attn, axis=0)
    t[p + "self_attn.v_proj.weight.T"] = _compose(
        partial(_scale_axis, s=attn, axis=0), partial(_scale_axis, s=o, axis=1, divide=True)
    )
    t[p + "self_attn.o_proj.weight.T"] = partial(_scale_axis, s=o_full.reshape(-1), axis=0)
    t[p + "post_attention_layernorm.weight"] = partial(_scale_axis, s=mlp, axis=0, divide=True)
    if arch.is_moe:
        down = {e: scales[f"{p}down/{e}"] for e in range(arch.num_experts) if f"{p}down/{e}" in scales}
        t[p + "mlp.experts.gate_up_proj"] = partial(_experts_transform, s_in=mlp, s_rows=down)
        t[p + "mlp.experts.down_proj"] = partial(_experts_transform_down, s=down)
        t[p + "mlp.gate.weight.T"] = partial(_scale_axis, s=mlp, axis=0)  # the float router
    else:
        down = scales[p + "down"]
        t[p + "mlp.gate_proj.weight.T"] = partial(_scale_axis, s=mlp, axis=0)
        t[p + "mlp.up_proj.weight.T"] = _compose(
            partial(_scale_axis, s=mlp, axis=0), partial(_scale_axis, s=down, axis=1, divide=True)
        )
        t[p + "mlp.down_proj.weight.T"] = partial(_scale_axis, s=down, axis=0)
    for key, ratios in scales.items():
        if key.startswith(p + "clip/"):
            name = clip_target(p, key[len(p) + len("clip/") :])
            t[name] = _compose(t[name], partial(clip_groups, ratios=ratios))
    return t


def awq_transforms(arch: Qwen3Arch, scales: dict[str, np.ndarray]) -> dict[str, Transform]:
    """Value transforms by ONNX initializer that apply the scales, their folds and the clipping ratios;
    `quantize_weights` runs them before quantizing."""
    t: dict[str, Transform] = {}
    for i in range(arch.num_layers):
        t |= layer_transforms(arch, i, scales)
    return t
