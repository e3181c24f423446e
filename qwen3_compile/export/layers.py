"""Qwen3's building blocks written as ONNX ops. Each function reads like the model code it mirrors.

Shapes in comments: B batch, S new tokens, P past tokens, T = P + S, H hidden, D head_dim,
Hq / Hkv query / key-value heads, g = Hq / Hkv, E experts, I intermediate size.
Numerics follow transformers: norms, router softmax and attention softmax in fp32; everything else in
the export dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from onnx import TensorProto

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH
from qwen3_compile.export.builder import GraphBuilder
from qwen3_compile.models.config import Qwen3Arch

FLOAT = TensorProto.FLOAT
MASK_MIN = float(torch.finfo(torch.float32).min)


def _to_float32(b: GraphBuilder, x: str) -> str:
    return x if b.float_type == FLOAT else b.op("Cast", x, to=FLOAT)


def _from_float32(b: GraphBuilder, x: str) -> str:
    return x if b.float_type == FLOAT else b.op("Cast", x, to=b.float_type)


def rms_norm(b: GraphBuilder, x: str, weight: str, eps: float) -> str:
    """weight * (x / sqrt(mean(x^2) + eps)), the reduction in fp32."""
    x32 = _to_float32(b, x)
    variance = b.op("ReduceMean", b.op("Mul", x32, x32), b.const([-1]), keepdims=1)
    inv_rms = b.op("Reciprocal", b.op("Sqrt", b.op("Add", variance, b.const(eps, "float32"))))
    return b.op("Mul", weight, _from_float32(b, b.op("Mul", x32, inv_rms)))


def linear(b: GraphBuilder, x: str, weight_t: str, hint: str) -> str:
    """x @ W^T with W^T stored as the initializer `weight_t` ([in, out])."""
    return b.op("MatMul", x, weight_t, hint=hint)


def rotary_inv_freq(arch: Qwen3Arch) -> torch.Tensor:
    """Computed exactly as transformers does (fp32), so positions rotate identically."""
    dim = arch.head_dim
    return 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rotary_cos_sin(b: GraphBuilder, position_ids: str, arch: Qwen3Arch) -> tuple[str, str]:
    """cos, sin: [B, 1, S, D] from position_ids [B, S]; angles in fp32."""
    inv_freq = b.weight("rotary.inv_freq", rotary_inv_freq(arch))  # [D/2]
    positions = b.op("Unsqueeze", b.op("Cast", position_ids, to=FLOAT), b.const([-1]))  # [B, S, 1]
    freqs = b.op("Mul", positions, inv_freq)  # [B, S, D/2]
    angles = b.op("Concat", freqs, freqs, axis=-1)  # [B, S, D]
    cos = b.op("Unsqueeze", _from_float32(b, b.op("Cos", angles)), b.const([1]), hint="cos")
    sin = b.op("Unsqueeze", _from_float32(b, b.op("Sin", angles)), b.const([1]), hint="sin")
    return cos, sin


def apply_rotary(b: GraphBuilder, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin, x: [B, heads, S, D]."""
    x1, x2 = b.op("Split", x, axis=-1, num_outputs=2, outputs=2)
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def attention_bias(b: GraphBuilder, input_ids: str, attention_mask: str) -> str:
    """Additive fp32 mask [B, 1, 1, S, T]: causal by index (works for left and right padding) and
    padding from attention_mask [B, T]. Shared by all layers."""
    with b.scope("attention_bias"):
        total = b.op("Squeeze", b.op("Shape", attention_mask, start=1, end=2))  # T
        new = b.op("Squeeze", b.op("Shape", input_ids, start=1, end=2))  # S
        past = b.op("Sub", total, new)  # P
        one = b.const(1)
        key_index = b.op("Unsqueeze", b.op("Range", b.const(0), total, one), b.const([0]))  # [1, T]
        query_index = b.op("Unsqueeze", b.op("Range", past, total, one), b.const([1]))  # [S, 1]
        causal = b.op("LessOrEqual", key_index, query_index)  # [S, T]
        not_padding = b.op("Unsqueeze", b.op("Cast", attention_mask, to=TensorProto.BOOL), b.const([1]))
        allowed = b.op("And", causal, not_padding)  # [B, S, T]
        bias = b.op("Where", allowed, b.const(0.0, "float32"), b.const(MASK_MIN, "float32"))
        return b.op("Unsqueeze", bias, b.const([1, 2]))  # [B, 1, 1, S, T]


@dataclass(frozen=True)
class AttentionInputs:
    cos: str
    sin: str
    bias: str
    past_key: str
    past_value: str


def self_attention(
    b: GraphBuilder, x: str, prefix: str, arch: Qwen3Arch, io: AttentionInputs
) -> tuple[str, str, str]:
    """Grouped-query attention with q/k RMSNorm and RoPE -> (out [B,S,H], present_key, present_value)."""
    hq, hkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    p = prefix + "self_attn."

    def heads(proj: str, n: int, norm: str | None) -> str:  # [B, S, n*D] -> [B, n, S, D]
        y = b.op("Reshape", linear(b, x, p + proj + ".weight.T", proj), b.const([0, 0, n, d]))
        if norm is not None:
            y = rms_norm(b, y, p + norm + ".weight", arch.rms_norm_eps)
        return b.op("Transpose", y, perm=[0, 2, 1, 3])

    q = apply_rotary(b, heads("q_proj", hq, "q_norm"), io.cos, io.sin)
    k = apply_rotary(b, heads("k_proj", hkv, "k_norm"), io.cos, io.sin)
    v = heads("v_proj", hkv, None)
    present_key = b.op("Concat", io.past_key, k, axis=2, hint="present_key")  # [B, Hkv, T, D]
    present_value = b.op("Concat", io.past_value, v, axis=2, hint="present_value")

    # group queries per kv head instead of repeating K/V: [B, Hkv, g, S, D] x [B, Hkv, 1, D, T]
    q_grouped = b.op("Reshape", q, b.const([0, hkv, hq // hkv, -1, d]))
    k_t = b.op("Transpose", b.op("Unsqueeze", present_key, b.const([2])), perm=[0, 1, 2, 4, 3])
    scores = b.op("Mul", b.op("MatMul", q_grouped, k_t), b.float_const(d**-0.5))
    scores = b.op("Add", _to_float32(b, scores), io.bias)  # [B, Hkv, g, S, T] fp32
    probs = _from_float32(b, b.op("Softmax", scores, axis=-1))
    context = b.op("MatMul", probs, b.op("Unsqueeze", present_value, b.const([2])))  # [B, Hkv, g, S, D]
    context = b.op("Reshape", context, b.const([0, hq, -1, d]))  # [B, Hq, S, D]
    context = b.op("Reshape", b.op("Transpose", context, perm=[0, 2, 1, 3]), b.const([0, 0, hq * d]))
    return linear(b, context, p + "o_proj.weight.T", "o_proj"), present_key, present_value


def dense_mlp(b: GraphBuilder, x: str, prefix: str) -> str:
    """down(silu(gate(x)) * up(x))."""
    p = prefix + "mlp."
    gate = linear(b, x, p + "gate_proj.weight.T", "gate_proj")
    up = linear(b, x, p + "up_proj.weight.T", "up_proj")
    activated = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    return linear(b, activated, p + "down_proj.weight.T", "down_proj")


def sparse_moe(b: GraphBuilder, x: str, prefix: str, arch: Qwen3Arch) -> str:
    """Router projection, then ONE ExpertDispatch node holding every expert's weights.

    The router runs in fp32 whatever the export dtype (its weights are tiny): in fp16 near-tied experts
    would otherwise flip relative to the fp32 reference and change a token's output wholesale."""
    p = prefix + "mlp."
    tokens = b.op("Reshape", x, b.const([-1, arch.hidden_size]))  # [B*S, H]
    router_logits = linear(b, _to_float32(b, tokens), p + "gate.weight.T", "router")  # [B*S, E] fp32
    b.opsets[DOMAIN] = 1
    out = b.op(
        EXPERT_DISPATCH,
        tokens,
        router_logits,
        p + "experts.gate_up_proj",
        p + "experts.down_proj",
        domain=DOMAIN,
        hint="experts",
        top_k=arch.top_k,
        normalize=int(arch.norm_topk_prob),
        activation="silu",
    )
    return b.op("Reshape", out, b.op("Shape", x))  # [B, S, H]
