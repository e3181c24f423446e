"""The graph contract every stage and runtime shares: the ONNX I/O names (Hugging Face/optimum convention),
the per-layer output names validation bisects on, and torch dtype -> ONNX element type."""

from __future__ import annotations

from onnx import TensorProto

# metadata_props key of graphs lowered with --attention gqa: the positions GroupQueryAttention's rotary
# tables cover (the export's max_positions; a static KV cache may hold at most that many)
GQA_MAX_POSITIONS = "qwen3_compile.gqa_max_positions"

# extra outputs of ONNX Runtime deployment graphs (`lower --for ort --logits last`): the greedy token [B, 1]
# int64 and whether the row's logits hold a NaN [B, 1] bool, both computed on the device
NEXT_TOKEN, LOGITS_NAN = "next_token", "logits_nan"

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"

# torch dtype name -> ONNX element type
ONNX_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "bool": TensorProto.BOOL,
}


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def layer_output_name(layer: int) -> str:
    """The tensor holding decoder layer `layer`'s output (validation bisects on these names)."""
    return f"layers.{layer}/residual_mlp/out"
