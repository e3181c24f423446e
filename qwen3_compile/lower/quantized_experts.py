"""The weight-only quantized experts behind an ExpertDispatch node, as the qmoe kernels take them.

The canonical quantized graph feeds ExpertDispatch's gate_up / down inputs from symmetric blocked
`DequantizeLinear(q [E, rows, cols], scale [E, rows, cols / B], axis=2, block_size=B)` over initializers
(quantize/weights.py, quantize/int4.py):

- INT8 weight-only: q int8, B = cols (one scale per expert and output row: scale [E, rows, 1]);
- INT4 weight-only: q int4 (ONNX packs two a byte, low nibble first, along the input axis), B = G, the
  recipe's group size (scale [E, rows, cols / G]).

Those bytes are what libqmoe reads (QMOE_I8: the int8 values with scales [E, rows]; QMOE_I4: the packed
nibbles [E, rows, cols / 2] with scales [E, rows, cols / G]), so a lowering can hand the initializers to the
kernels unchanged. `quantized_experts` finds them or says why not; `kernel_limits` says what the kernels
refuse. Shared by the ORT custom-op rule and the TensorRT plugin rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from qwen3_compile.lower.rules import GraphView

_KINDS = {TensorProto.INT8: "int8", TensorProto.INT4: "int4"}


@dataclass(frozen=True)
class QuantizedExperts:
    """The initializers behind gate_up [E, 2I, H] and down [E, H, I] and how they dequantize."""

    kind: str  # "int8" (per output row) or "int4" (per group of input channels)
    gate_up: str
    down: str
    gate_up_scale: str
    down_scale: str
    scale_type: int  # TensorProto type of both scales (= the DequantizeLinear outputs' type)
    gate_up_block: int  # input channels a scale: H (int8) or G (int4)
    down_block: int  # I (int8) or G (int4)
    experts: int
    hidden: int
    inter: int

    @property
    def group_size(self) -> int:
        """The INT4 group size G (0 for INT8, as qmoe_problem.group_size)."""
        return self.gate_up_block if self.kind == "int4" else 0


@dataclass(frozen=True)
class _Source:
    values: str
    scale: str
    kind: str
    scale_type: int
    block: int
    dims: tuple[int, int, int]


def _dequantized(view: GraphView, value: str) -> _Source | str:
    """The symmetric blocked DequantizeLinear along axis 2 that produces `value`, or why not."""
    node = view.producers.get(value)
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return f"'{value}' is neither a float initializer nor a DequantizeLinear output"
    if len(node.input) > 2 and node.input[2]:
        return f"'{node.name}' has a zero point (weight-only experts are symmetric)"
    values, scale = node.input[:2]
    kind = _KINDS.get(view.elem_type(values))
    if kind is None:
        return f"'{values}' is not an INT8 or INT4 initializer"
    scale_type = view.elem_type(scale)
    if scale_type is None:
        return f"the scale '{scale}' is not an initializer"
    dims = tuple(view.initializers[values].dims)
    scale_dims = tuple(view.initializers[scale].dims)
    attrs = view.attrs(node)
    block = int(attrs.get("block_size", 0))
    if len(dims) != 3 or attrs.get("axis", 1) != 2 or block < 1 or dims[2] % block:
        return f"'{values}' is not quantized [experts, rows, cols] in blocks along its input axis (axis 2)"
    if scale_dims != (dims[0], dims[1], dims[2] // block):
        return f"the scale '{scale}' has shape {list(scale_dims)}, not [experts, rows, cols / block_size]"
    if kind == "int8" and block != dims[2]:
        return f"'{values}' is INT8 in blocks of {block}: the kernels take one INT8 scale per output row"
    return _Source(values, scale, kind, scale_type, block, dims)


def quantized_experts(view: GraphView, node: onnx.NodeProto) -> QuantizedExperts | str:
    """The weight-only quantized experts behind ExpertDispatch `node`'s inputs 2 and 3, or why not."""
    sources = [_dequantized(view, value) for value in node.input[2:4]]
    for source in sources:
        if isinstance(source, str):
            return source
    gate_up, down = sources
    if gate_up.kind != down.kind:
        return f"gate_up is {gate_up.kind} and down is {down.kind}: the kernels take one weight type"
    if gate_up.scale_type != down.scale_type:
        return "gate_up and down have scales of different types"
    experts, two_inter, hidden = gate_up.dims
    if two_inter % 2 or down.dims != (experts, hidden, two_inter // 2):
        return f"gate_up {list(gate_up.dims)} and down {list(down.dims)} are not [E, 2I, H] and [E, H, I]"
    return QuantizedExperts(
        gate_up.kind,
        gate_up.values,
        down.values,
        gate_up.scale,
        down.scale,
        gate_up.scale_type,
        gate_up.block,
        down.block,
        experts,
        hidden,
        two_inter // 2,
    )


def is_dequantized(view: GraphView, value: str) -> bool:
    """Whether `value` comes from a DequantizeLinear (a quantized-expert candidate, matching or not)."""
    producer = view.producers.get(value)
    return producer is not None and producer.op_type == "DequantizeLinear"


def kernel_limits(experts: QuantizedExperts, top_k: int) -> str | None:
    """Why the qmoe kernels refuse these quantized experts (None: they take them); the shapes as
    `trt_contract.check_shapes` states them, the types and INT4 groups as qmoe.h does."""
    from qwen3_compile.kernels import trt_contract as contract

    if experts.scale_type == TensorProto.FLOAT:
        return (
            "the experts dequantize to fp32 (fp32 scales, so fp32 activations); the kernels run fp16/bf16 "
            "activations: quantize an --dtype fp16 export"
        )
    if experts.scale_type != TensorProto.FLOAT16:
        name = TensorProto.DataType.Name(experts.scale_type).lower()
        return f"{name} scales: the kernels read fp32 or fp16 scales with fp16/bf16 activations"
    if experts.kind == "int4":
        if experts.gate_up_block != experts.down_block:
            return (
                f"gate_up and down have different INT4 group sizes ({experts.gate_up_block}, "
                f"{experts.down_block}); the kernels take one"
            )
        if experts.gate_up_block not in contract.INT4_GROUP_SIZES:
            return f"INT4 group size {experts.gate_up_block}: the kernels take {contract.INT4_GROUP_SIZES}"
    try:
        contract.check_shapes(experts.experts, experts.hidden, experts.inter, top_k)
    except ValueError as err:
        return str(err).removeprefix(f"{contract.PLUGIN_NAME}: ")
    return None


def activation(attrs: dict) -> str:
    """An ExpertDispatch node's `activation` attribute as text (default "silu")."""
    value = attrs.get("activation", b"silu")
    return value.decode() if isinstance(value, bytes) else str(value)
