"""Sizes from the architecture alone: parameter counts, weight bytes per precision, KV cache, memory plan.

Weight bytes follow our quantization conventions (DESIGN.md section 4): the linear layers of attention
and MLP/experts are quantized; embeddings, lm_head, the MoE router and norms stay fp16. INT8/FP8 add
one fp32 scale per output channel (per expert for MoE); INT4 is weight-only with one fp16 scale per
block of 128 input elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.targets import Target

if TYPE_CHECKING:
    from qwen3_compile.models.quantized import ImportedQuantization

GB = 1e9
INT4_BLOCK = 128
# bits per weight element and scale bytes per output row (per-channel) or per block
_WEIGHT_BITS = {"fp16": 16, "fp8": 8, "int8": 8, "int4": 4}
_KV_BYTES = {"fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # per token: all dense weights plus top_k of the experts
    embedding: int  # embed_tokens (+ lm_head when untied)
    quantizable: int  # linear weights of attention and MLP/experts
    quantizable_rows: int  # their output channels (one scale each)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(arch: Qwen3Arch) -> ParameterCounts:
    h, L = arch.hidden_size, arch.num_layers
    attn = h * arch.q_dim * 2 + h * arch.kv_dim * 2  # q, o and k, v
    attn_rows = arch.q_dim + 2 * arch.kv_dim + h  # q, k, v, o outputs
    norms = 2 * h + 2 * arch.head_dim
    if arch.is_moe:
        per_expert = 3 * h * arch.moe_intermediate_size
        experts = arch.num_experts * per_expert
        router = arch.num_experts * h
        mlp_total, mlp_active = experts + router, arch.top_k * per_expert + router
        mlp_quant = experts
        mlp_rows = arch.num_experts * (2 * arch.moe_intermediate_size + h)
    else:
        mlp_total = mlp_active = mlp_quant = 3 * h * arch.intermediate_size
        mlp_rows = 2 * arch.intermediate_size + h
    embedding = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    total = embedding + L * (attn + norms + mlp_total) + h
    active = embedding + L * (attn + norms + mlp_active) + h
    return ParameterCounts(
        total=total,
        active=active,
        embedding=embedding,
        quantizable=L * (attn + mlp_quant),
        quantizable_rows=L * (attn_rows + mlp_rows),
    )


def weight_bytes(arch: Qwen3Arch, precision: str) -> int:
    """Deployed weight size with `precision` applied to the quantizable linear weights."""
    counts = count_parameters(arch)
    rest = (counts.total - counts.quantizable) * 2
    if precision == "fp16":
        return counts.total * 2
    quant = counts.quantizable * _WEIGHT_BITS[precision] // 8
    if precision == "int4":
        scales = counts.quantizable // INT4_BLOCK * 2
    else:
        scales = counts.quantizable_rows * 4
    return rest + quant + scales


# A call of the exported graph reads past_key_values.* and writes present.* (the past plus the new positions)
# into separate buffers, so whoever runs it holds two copies of the cache during a call.
KV_COPIES = 2


def kv_bytes_per_token(arch: Qwen3Arch, kv_dtype: str = "fp16") -> int:
    return 2 * arch.num_layers * arch.kv_dim * _KV_BYTES[kv_dtype]


def activation_bytes(arch: Qwen3Arch, prefill_tokens: int, context: int) -> int:
    """Peak fp16 activations of one layer for a prefill chunk (deployment graph: last-token logits).

    An upper bound that assumes decomposed attention materialising scores and probabilities.
    """
    p, h = prefill_tokens, arch.hidden_size
    residual = 4 * p * h * 2
    qkv = p * (arch.q_dim + 2 * arch.kv_dim) * 2
    scores = 2 * p * arch.num_heads * context * 2
    if arch.is_moe:
        mlp = p * arch.top_k * (3 * arch.moe_intermediate_size + h) * 2 + p * arch.num_experts * 4
    else:
        mlp = 3 * p * arch.intermediate_size * 2
    logits = arch.vocab_size * 4
    return residual + qkv + scores + mlp + logits


@dataclass(frozen=True)
class MemoryPlan:
    precision: str
    kv_dtype: str
    context: int
    batch: int
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def imported_weight_bytes(arch: Qwen3Arch, quantization: ImportedQuantization) -> int:
    """Deployed weight size of a published quantized checkpoint: its quantized linears as stored (values,
    scales, zero points), everything else in fp16."""
    rest = count_parameters(arch).total - quantization.quantized_parameters
    return quantization.stored_bytes + rest * 2


def plan_memory(
    arch: Qwen3Arch,
    precision: str,
    context: int,
    batch: int = 1,
    kv_dtype: str = "fp16",
    prefill_chunk: int = 512,
    weights: int | None = None,
) -> MemoryPlan:
    """`weights`: the weight bytes when they are known (an imported checkpoint), else from `precision`."""
    chunk = min(prefill_chunk, context)
    return MemoryPlan(
        precision,
        kv_dtype,
        context,
        batch,
        weight_bytes(arch, precision) if weights is None else weights,
        KV_COPIES * batch * context * kv_bytes_per_token(arch, kv_dtype),
        batch * activation_bytes(arch, chunk, context),
    )


@dataclass(frozen=True)
class TargetFit:
    target: Target
    # precision -> free GB after the plan (negative: short by that much); None if the target cannot run it
    headroom_gb: dict[str, float | None]

    @property
    def best(self) -> str | None:
        """The highest precision that fits, preferring fp16 > fp8 > int8 > int4."""
        for precision in ("fp16", "fp8", "int8", "int4"):
            free = self.headroom_gb.get(precision)
            if free is not None and free >= 0:
                return precision
        return None


def fit_targets(
    arch: Qwen3Arch,
    targets: list[Target],
    context: int,
    batch: int = 1,
    weights: dict[str, int] | None = None,
) -> list[TargetFit]:
    """Headroom per target and precision. `weights`: {precision: bytes} of a checkpoint whose precision is
    fixed (an imported one): only those precisions, at those sizes."""
    fits = []
    for target in targets:
        headroom: dict[str, float | None] = {}
        for precision in weights or ("fp16", "fp8", "int8", "int4"):
            if precision not in target.precisions:
                headroom[precision] = None
                continue
            plan = plan_memory(arch, precision, context, batch, weights=(weights or {}).get(precision))
            headroom[precision] = target.usable_gb - plan.total / GB
        fits.append(TargetFit(target, headroom))
    return fits
