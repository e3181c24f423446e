"""An imported quantized checkpoint's linears in the graph, as its own values behind DequantizeLinear.

Each quantized linear becomes `<name>.q` (its stored integers or E4M3 values, transposed to the graph's
`[in, out]`), `<name>.scale` and, for asymmetric formats, `<name>.zero_point`, read by a blocked
DequantizeLinear along the input axis (opset 21) whose output `<name>.dequantized` feeds the MatMul:
the quantize stage's form, so nothing downstream needs to know the weights were imported. Stacked MoE
experts are `[E, rows, in]` with `axis=2`. GPTQ's desc_act order is kept exactly: the values are stored
with their input channels sorted by group (so every block is contiguous) and a Gather along the input
axis puts the dequantized rows back in channel order.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.errors import BadInputError
from qwen3_compile.export.builder import GraphBuilder
from qwen3_compile.models.quantized import ImportedQuantization, NotRepresentable, QdqArrays, onnx_arrays

# the quantize stage's name for a weight's DequantizeLinear output (quantize.weights.dequantized_name; the
# tests hold the two to each other: export must not import quantize, which imports export)
DEQUANTIZED = ".dequantized"
SCALE_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
_UNSIGNED = {"int4": ("uint4", ml_dtypes.uint4, 8), "int8": ("uint8", np.uint8, 128)}


def _refuse(weight: str, quant: ImportedQuantization, why: str) -> BadInputError:
    entry = next(iter(quant.linears[weight].tensors.values()))
    return BadInputError(
        f"'{weight.removesuffix('.weight')}' ({quant.format.label}) has no exact form in the graph: {why}.",
        file=entry.file,
        field=entry.name,
        fix="use the BF16 release of the model and quantize it with a qwen3-compile recipe.",
    )


def _arrays(quant: ImportedQuantization, weight: str) -> QdqArrays:
    try:
        return onnx_arrays(quant.read(weight))
    except NotRepresentable as err:
        raise _refuse(weight, quant, str(err)) from None


def _unsigned(a: QdqArrays) -> QdqArrays:
    """A symmetric weight with an explicit zero point, to stack with asymmetric ones."""
    if a.zero_point is not None or a.dtype not in _UNSIGNED:
        return a
    name, kind, mid = _UNSIGNED[a.dtype]
    values = (a.values.astype(np.int16) + mid).astype(kind)
    zero = np.full(a.scale.shape, mid, dtype=kind)
    return QdqArrays(values, a.scale, zero, a.block, a.order, name)


def _stack(quant: ImportedQuantization, experts: list[list[str]]) -> QdqArrays:
    """Per expert, its linears' rows concatenated (gate then up); then stacked: [E, rows, in]."""
    parts = [[_arrays(quant, w) for w in names] for names in experts]
    flat = [a for p in parts for a in p]
    for a, w in zip(flat, [w for names in experts for w in names], strict=True):
        if a.order is not None:
            raise _refuse(w, quant, "desc_act experts would need one input order per expert in one tensor")
    if len({a.dtype for a in flat}) > 1:
        parts = [[_unsigned(a) for a in p] for p in parts]
        flat = [a for p in parts for a in p]
    if len({a.dtype for a in flat}) > 1 or len({a.block for a in flat}) > 1:
        raise _refuse(experts[0][0], quant, "its experts are stored in different forms")

    def cat(get):
        return np.stack([np.concatenate([get(a) for a in p], axis=0) for p in parts])

    zero = cat(lambda a: a.zero_point) if flat[0].zero_point is not None else None
    return QdqArrays(
        cat(lambda a: a.values), cat(lambda a: a.scale), zero, flat[0].block, None, flat[0].dtype
    )


def _add(b: GraphBuilder, name: str, array: np.ndarray) -> str:
    sink = b.weight_sink
    proto = sink.add(name, array) if sink is not None else numpy_helper.from_array(np.asarray(array), name)
    return b.add_initializer(proto)


def emit_imported(
    b: GraphBuilder, name: str, quant: ImportedQuantization, weights: list[list[str]] | str
) -> str:
    """Write the imported weight behind graph initializer `name` (`<w>.T` for a linear, the fused expert
    name for `weights` = per-expert [[gate, up], ...] or [[down], ...]); returns the dequantized output."""
    if isinstance(weights, str):
        a = _arrays(quant, weights)
        values, scale = a.values.T, a.scale.T  # [in, out], [blocks, out]
        zero = a.zero_point.T if a.zero_point is not None else None
        axis = 0
    else:
        a = _stack(quant, weights)
        values, scale, zero, axis = a.values, a.scale, a.zero_point, 2
    scale_type = SCALE_TYPES.get(b.float_type)
    if scale_type is None:
        raise BadInputError(
            "imported quantized checkpoints export as fp32 or fp16 graphs.",
            field="--dtype",
            fix="export with --dtype fp32 (the ONNX Runtime reference) or fp16.",
        )
    typed = scale.astype(scale_type)
    if not np.array_equal(typed.astype(np.float32), scale):
        what = weights if isinstance(weights, str) else weights[0][0]
        raise _refuse(
            what, quant, f"its scales are not exact in {np.dtype(scale_type).name}; export --dtype fp32"
        )
    inputs = [
        _add(b, name + ".q", np.ascontiguousarray(values)),
        _add(b, name + ".scale", np.ascontiguousarray(typed)),
    ]
    if zero is not None:
        inputs.append(_add(b, name + ".zero_point", np.ascontiguousarray(zero)))
    out = name + DEQUANTIZED
    dq_out = out if a.order is None else name + ".sorted"
    b.nodes.append(
        helper.make_node(
            "DequantizeLinear",
            inputs,
            [dq_out],
            name=name + "/DequantizeLinear",
            axis=axis,
            block_size=a.block,
        )
    )
    if a.order is not None:  # rows back in input-channel order
        restore = _add(b, name + ".order", np.argsort(a.order).astype(np.int64))
        b.nodes.append(helper.make_node("Gather", [dq_out, restore], [out], name=name + "/Gather", axis=0))
    return out


def rewire(graph, replace: dict[str, str]) -> None:
    """Nodes that read a replaced weight read its dequantized output instead."""
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in replace:
                node.input[i] = replace[value]
