"""The canonical Qwen3 ONNX graph: optimum-style I/O, past/present KV cache, one graph for prefill and
decode, MoE as one `qwen3_compile::ExpertDispatch` node per layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
import torch
from onnx import TensorProto

from qwen3_compile import __version__
from qwen3_compile.custom_ops import EXPERT_DISPATCH, function
from qwen3_compile.export.builder import GraphBuilder
from qwen3_compile.export.layers import (
    AttentionInputs,
    attention_bias,
    dense_mlp,
    rms_norm,
    rotary_cos_sin,
    self_attention,
    sparse_moe,
)
from qwen3_compile.export.weights import EMBEDDINGS, WeightSource, weight_groups
from qwen3_compile.graph_contract import (
    BATCH,
    ONNX_DTYPES,
    PAST,
    SEQ,
    TOTAL,
    past_names,
    present_names,
)
from qwen3_compile.models.config import Qwen3Arch


def decoder_layer(
    b: GraphBuilder, arch: Qwen3Arch, i: int, x: str, io: AttentionInputs
) -> tuple[str, str, str]:
    """Decoder layer `i` on hidden states `x` -> (output, present key, present value). Only names depend
    on `i`: the layer's weights are referred to by name and written separately."""
    prefix = f"model.layers.{i}."
    with b.scope(f"layers.{i}"):
        h = rms_norm(b, x, prefix + "input_layernorm.weight", arch.rms_norm_eps)
        attn, key, value = self_attention(b, h, prefix, arch, io)
        x = b.op("Add", x, attn, hint="residual_attn")
        h = rms_norm(b, x, prefix + "post_attention_layernorm.weight", arch.rms_norm_eps)
        mlp = sparse_moe(b, h, prefix, arch) if arch.is_moe else dense_mlp(b, h, prefix)
        return b.op("Add", x, mlp, hint="residual_mlp"), key, value


def build_layered_graph(
    arch: Qwen3Arch,
    weights: WeightSource,
    dtype: torch.dtype = torch.float32,
    opset: int = 21,
    weight_sink: Any = None,
    on_group: Callable[[int], None] = lambda group: None,
) -> onnx.ModelProto:
    """The whole model, weights written group by group (`weight_groups`: embeddings, each decoder layer,
    final norm and lm_head) just before the nodes that use them; `on_group(g)` runs after group g is
    written, so a caller can sync, journal and report progress per layer."""
    float_type = ONNX_DTYPES[str(dtype).removeprefix("torch.")]
    b = GraphBuilder(float_type, weight_sink)
    groups = weight_groups(arch)

    def write(group: int) -> None:
        for plan in groups[group]:
            weights.emit(b, plan, dtype)
        weights.end_group()
        on_group(group)

    write(0)
    input_ids = b.input("input_ids", TensorProto.INT64, [BATCH, SEQ])
    attention_mask = b.input("attention_mask", TensorProto.INT64, [BATCH, TOTAL])
    position_ids = b.input("position_ids", TensorProto.INT64, [BATCH, SEQ])
    kv_shape = [BATCH, arch.num_kv_heads, PAST, arch.head_dim]
    pasts = [
        (b.input(k, float_type, kv_shape), b.input(v, float_type, kv_shape))
        for k, v in (past_names(i) for i in range(arch.num_layers))
    ]

    x = b.op("Gather", EMBEDDINGS, input_ids, axis=0, hint="embed_tokens")  # [B, S, H]
    with b.scope("rotary"):
        cos, sin = rotary_cos_sin(b, position_ids, arch)
    bias = attention_bias(b, input_ids, attention_mask)
    presents = []
    for i in range(arch.num_layers):
        write(1 + i)
        x, key, value = decoder_layer(b, arch, i, x, AttentionInputs(cos, sin, bias, *pasts[i]))
        presents.append((key, value))

    write(1 + arch.num_layers)
    with b.scope("lm_head"):
        x = rms_norm(b, x, "model.norm.weight", arch.rms_norm_eps)
        if arch.tie_word_embeddings:
            head = b.op("Transpose", EMBEDDINGS, perm=[1, 0], hint="tied_lm_head")
        else:
            head = "lm_head.weight.T"
        logits = b.op("MatMul", x, head)
        if float_type != TensorProto.FLOAT:
            logits = b.op("Cast", logits, to=TensorProto.FLOAT)
    b.output(logits, "logits", TensorProto.FLOAT, [BATCH, SEQ, arch.vocab_size])
    present_shape = [BATCH, arch.num_kv_heads, TOTAL, arch.head_dim]
    for i, (key, value) in enumerate(presents):
        key_name, value_name = present_names(i)
        b.output(key, key_name, float_type, present_shape)
        b.output(value, value_name, float_type, present_shape)

    functions = [function(EXPERT_DISPATCH, opset)] if arch.is_moe else []
    return b.make_model("qwen3", opset, functions, version=__version__)
