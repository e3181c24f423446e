"""Weight quantization as a graph rewrite: a selected float initializer becomes INT8, FP8 (E4M3) or INT4
values plus scales behind a `DequantizeLinear` (symmetric, zero point 0: the TensorRT explicit-quantization
form). Scales take the graph's float type (fp32 or fp16), as a strongly typed network wants.

Linear weights are stored `[in, out]` (`<name>.T`): one scale per output channel, `axis=1`. Stacked
expert weights `[E, rows, cols]` get one scale per expert and output row: a blocked DequantizeLinear
(opset 21) over the last axis with `block_size = cols`, scales `[E, rows, 1]`. INT4 is per group of input
channels, blocked along the input axis of both forms (int4.py).

Tensors are read and written one at a time (`WeightStore` in, a sink out); `transforms` rewrite a
tensor's float values on the way (SmoothQuant's folded scales) before it is quantized or passed on.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from qwen3_compile.quantize.int4 import input_axis
from qwen3_compile.quantize.recipe import QuantRecipe
from qwen3_compile.quantize.weight_store import WeightStore
from qwen3_compile.storage.manifests import QuantizedTensor  # what the manifest records of each weight

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
INT4_MAX = 7.0  # the grid is symmetric: -8 is never used (int4.py)
QUANT_MAX = {"int8": INT8_MAX, "fp8": FP8_E4M3_MAX, "int4": INT4_MAX}
QUANTIZED_DTYPES = ("int8", "fp8", "int4")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)

Transform = Callable[[np.ndarray], np.ndarray]


def cast_quantized(scaled: np.ndarray, dtype: str) -> np.ndarray:
    """Values already divided by their scale -> int8 or int4 (round half to even, as QuantizeLinear) or
    E4M3."""
    clipped = np.clip(scaled, -QUANT_MAX[dtype], QUANT_MAX[dtype])
    if dtype == "int8":
        return np.rint(clipped).astype(np.int8)
    if dtype == "int4":
        return np.rint(clipped).astype(ml_dtypes.int4)
    return clipped.astype(ml_dtypes.float8_e4m3fn)


def quantize_symmetric(weights: np.ndarray, reduce_axis: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """One scale per slice along every axis but `reduce_axis` (kept as size 1): absmax / qmax.
    Stacked expert weights are done one expert at a time (a 30B-A3B layer's experts are 1.6 GB in fp32)."""
    if weights.ndim == 3 and reduce_axis == 2:
        parts = [quantize_symmetric(expert, 1, dtype) for expert in weights]
        return np.stack([q for q, _ in parts]), np.stack([s for _, s in parts])
    absmax = np.abs(weights).max(axis=reduce_axis, keepdims=True).astype(np.float32)
    scale = np.where(absmax > 0, absmax / QUANT_MAX[dtype], 1.0).astype(weights.dtype)
    return cast_quantized(weights.astype(np.float32) / scale.astype(np.float32), dtype), scale


def quantize_groups(weights: np.ndarray, group: int, dtype: str = "int4") -> tuple[np.ndarray, np.ndarray]:
    """One scale per `group` consecutive input channels (and output channel): values in the weights' shape,
    scales with the input axis divided by `group` (int4.py's layouts). Experts one at a time."""
    if weights.ndim == 3:  # [E, rows, in]: each expert as [in, rows]
        parts = [quantize_groups(expert.T, group, dtype) for expert in weights]
        return np.stack([q.T for q, _ in parts]), np.stack([s.T for _, s in parts])
    rows, cols = weights.shape  # [in, out]
    q, scale = quantize_symmetric(weights.reshape(rows // group, group, cols), 1, dtype)
    return q.reshape(rows, cols), scale.reshape(rows // group, cols)


def quantize_int8(weights: np.ndarray, reduce_axis: int) -> tuple[np.ndarray, np.ndarray]:
    return quantize_symmetric(weights, reduce_axis, "int8")


def checkpoint_name(initializer: str) -> str:
    return initializer.removesuffix(".T")


_DEQUANTIZED = ".dequantized"


def dequantized_name(initializer: str) -> str:
    return initializer + _DEQUANTIZED


def dequantized_source(name: str) -> str | None:
    """The checkpoint name behind a `dequantized_name` output, or None for any other tensor."""
    return checkpoint_name(name.removesuffix(_DEQUANTIZED)) if name.endswith(_DEQUANTIZED) else None


LM_HEAD = "lm_head.weight.T"  # the untied output projection, [hidden, vocab]
EMBEDDINGS = "model.embed_tokens.weight"  # [vocab, hidden]; tied models' projection reads its transpose


def selected(proto: onnx.TensorProto, recipe: QuantRecipe) -> bool:
    """Whether the recipe quantizes this initializer: its `select` patterns, and the untied lm_head when
    the recipe's `weights.lm_head` says so (its own format, whatever `select` says)."""
    if recipe.weights.dtype not in QUANTIZED_DTYPES or proto.data_type not in FLOAT_TYPES:
        return False
    if proto.name == LM_HEAD:
        return recipe.weights.lm_head != "float"
    return len(proto.dims) >= 2 and recipe.select.selects(checkpoint_name(proto.name))


def _tied_projection(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The Transpose of the embedding table that a tied model's lm_head MatMul reads."""
    return next((n for n in graph.node if n.op_type == "Transpose" and list(n.input) == [EMBEDDINGS]), None)


def tied_lm_head(model: onnx.ModelProto, recipe: QuantRecipe) -> bool:
    """Whether the recipe quantizes lm_head of a model whose projection reads the embedding table."""
    return (
        recipe.weights.lm_head != "float"
        and recipe.weights.dtype in QUANTIZED_DTYPES
        and _tied_projection(model.graph) is not None
    )


def _feed_projection_from(graph: onnx.GraphProto, value: str) -> None:
    """Point the readers of the tied Transpose at `value` and drop the Transpose."""
    transpose = _tied_projection(graph)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == transpose.output[0]:
                node.input[i] = value
    graph.node.remove(transpose)


def _quantize_into(
    name: str, weights: np.ndarray, dtype: str, group: int | None, sink, keep: list, nodes: list
) -> QuantizedTensor:
    """`weights` as `dtype` values + scales through `sink` (appended to `keep`) and the DequantizeLinear
    that gives `dequantized_name(name)` (appended to `nodes`)."""
    if dtype == "int4":  # a scale per group of input channels
        q, scale = quantize_groups(weights, group)
        attrs = {"axis": input_axis(weights.ndim), "block_size": group}
    elif weights.ndim == 2:  # [in, out]: a scale per output column
        q, scale = quantize_symmetric(weights, 0, dtype)
        scale, attrs = scale.reshape(-1), {"axis": 1}
    else:  # [E, rows, cols]: a scale per expert and row
        q, scale = quantize_symmetric(weights, 2, dtype)
        attrs = {"axis": 2, "block_size": weights.shape[2]}
    keep += [sink.add(name + ".q", q), sink.add(name + ".scale", scale)]
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [name + ".q", name + ".scale"],
            [dequantized_name(name)],
            name=name + "/DequantizeLinear",
            **attrs,
        )
    )
    values_bytes = (q.size + 1) // 2 if dtype == "int4" else q.nbytes  # packed
    return QuantizedTensor(
        name=checkpoint_name(name),
        shape=tuple(weights.shape),
        float_bytes=weights.nbytes,
        quantized_bytes=values_bytes + scale.nbytes,
    )


def quantize_weights(
    model: onnx.ModelProto,
    recipe: QuantRecipe,
    store: WeightStore,
    sink,
    transforms: dict[str, Transform],
) -> list[QuantizedTensor]:
    """Rewrite `model` in place; returns what was quantized (nothing for the fp16 baseline). Tensors that
    `store` reads from external data are written through `sink` (the store is then streamed, and so is the
    sink: `open_sink`)."""
    graph = model.graph
    done: list[QuantizedTensor] = []
    replace: dict[str, str] = {}
    keep, new_nodes = [], []
    for proto in list(graph.initializer):
        name = proto.name
        chosen, transform = selected(proto, recipe), transforms.get(name)
        if not chosen:
            if transform is not None:
                keep.append(sink.add(name, transform(store.array(name))))
            elif store.is_external(name):
                keep.append(sink.add(name, store.array(name)))  # copied through, one tensor at a time
            else:
                keep.append(proto)
            continue
        weights = store.array(name)
        weights = transform(weights) if transform is not None else weights
        dtype = recipe.weights.lm_head if name == LM_HEAD else recipe.weights.dtype
        done.append(_quantize_into(name, weights, dtype, recipe.weights.group_size, sink, keep, new_nodes))
        replace[name] = dequantized_name(name)
        del weights
    if tied_lm_head(model, recipe):  # a quantized copy of the table for the projection; the gather keeps it
        weights = np.ascontiguousarray(store.array(EMBEDDINGS).T)  # [H, vocab]
        done.append(
            _quantize_into(
                LM_HEAD, weights, recipe.weights.lm_head, recipe.weights.group_size, sink, keep, new_nodes
            )
        )
        del weights
        _feed_projection_from(graph, dequantized_name(LM_HEAD))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in replace:
                node.input[i] = replace[value]
    nodes = new_nodes + list(graph.node)  # dequantize nodes first: a valid topological order
    del graph.node[:]
    graph.node.extend(nodes)
    return done
