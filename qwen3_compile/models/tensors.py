"""The tensors a Qwen3 checkpoint must hold, derived from its architecture.

Two MoE expert layouts exist: checkpoints on disk store one matrix per expert
(`mlp.experts.{e}.gate_proj.weight` ...), transformers 5 fuses them in memory
(`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`) and some tools save that.
We accept either on disk and always hand the model the fused layout.
"""

from __future__ import annotations

from enum import StrEnum

from qwen3_compile.models.config import Qwen3Arch

Shape = tuple[int, ...]


class ExpertLayout(StrEnum):
    PER_EXPERT = "per_expert"
    FUSED = "fused"


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def attention_shapes(arch: Qwen3Arch, i: int) -> dict[str, Shape]:
    p = _layer_prefix(i) + "self_attn."
    return {
        p + "q_proj.weight": (arch.q_dim, arch.hidden_size),
        p + "k_proj.weight": (arch.kv_dim, arch.hidden_size),
        p + "v_proj.weight": (arch.kv_dim, arch.hidden_size),
        p + "o_proj.weight": (arch.hidden_size, arch.q_dim),
        p + "q_norm.weight": (arch.head_dim,),
        p + "k_norm.weight": (arch.head_dim,),
    }


def mlp_shapes(arch: Qwen3Arch, i: int, layout: ExpertLayout) -> dict[str, Shape]:
    p = _layer_prefix(i) + "mlp."
    h = arch.hidden_size
    if not arch.is_moe:
        inter = arch.intermediate_size
        return {
            p + "gate_proj.weight": (inter, h),
            p + "up_proj.weight": (inter, h),
            p + "down_proj.weight": (h, inter),
        }
    e, inter = arch.num_experts, arch.moe_intermediate_size
    shapes: dict[str, Shape] = {p + "gate.weight": (e, h)}
    if layout is ExpertLayout.FUSED:
        shapes[p + "experts.gate_up_proj"] = (e, 2 * inter, h)
        shapes[p + "experts.down_proj"] = (e, h, inter)
    else:
        for j in range(e):
            q = f"{p}experts.{j}."
            shapes[q + "gate_proj.weight"] = (inter, h)
            shapes[q + "up_proj.weight"] = (inter, h)
            shapes[q + "down_proj.weight"] = (h, inter)
    return shapes


def layer_shapes(arch: Qwen3Arch, i: int, layout: ExpertLayout = ExpertLayout.FUSED) -> dict[str, Shape]:
    p = _layer_prefix(i)
    shapes = {
        p + "input_layernorm.weight": (arch.hidden_size,),
        p + "post_attention_layernorm.weight": (arch.hidden_size,),
    }
    shapes.update(attention_shapes(arch, i))
    shapes.update(mlp_shapes(arch, i, layout))
    return shapes


def expected_shapes(
    arch: Qwen3Arch, layout: ExpertLayout = ExpertLayout.FUSED, include_lm_head: bool | None = None
) -> dict[str, Shape]:
    """Every tensor name -> shape. `lm_head.weight` is included unless embeddings are tied."""
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size)}
    for i in range(arch.num_layers):
        shapes.update(layer_shapes(arch, i, layout))
    shapes["model.norm.weight"] = (arch.hidden_size,)
    if include_lm_head if include_lm_head is not None else not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    return shapes


def detect_expert_layout(names: set[str]) -> ExpertLayout:
    if any(n.endswith("experts.gate_up_proj") for n in names):
        return ExpertLayout.FUSED
    return ExpertLayout.PER_EXPERT


def fused_expert_names(layer: int) -> tuple[str, str]:
    p = _layer_prefix(layer) + "mlp.experts."
    return p + "gate_up_proj", p + "down_proj"


def per_expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    p = f"{_layer_prefix(layer)}mlp.experts.{expert}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"
