"""Weight quantization as a graph rewrite: a selected float initializer becomes INT8 values plus fp32
scales behind a `DequantizeLinear` (symmetric, zero point 0: the TensorRT explicit-quantization form).

Linear weights are stored `[in, out]` (`<name>.T`): one scale per output channel, `axis=1`. Stacked
expert weights `[E, rows, cols]` get one scale per expert and output row: a blocked DequantizeLinear
(opset 21) over the last axis with `block_size = cols`, scales `[E, rows, 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qwen3_compile.quantize.recipe import QuantRecipe

INT8_MAX = 127.0


def quantize_int8(weights: np.ndarray, reduce_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 with one scale per slice along every axis but `reduce_axis` (kept as size 1)."""
    absmax = np.abs(weights).max(axis=reduce_axis, keepdims=True).astype(np.float32)
    scale = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(weights / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class QuantizedTensor:
    name: str  # checkpoint name
    shape: tuple[int, ...]
    float_bytes: int
    quantized_bytes: int  # int8 values + fp32 scales


def checkpoint_name(initializer: str) -> str:
    return initializer.removesuffix(".T")


def quantize_weights(model: onnx.ModelProto, recipe: QuantRecipe) -> list[QuantizedTensor]:
    """Rewrite `model` in place; returns what was quantized."""
    graph = model.graph
    done: list[QuantizedTensor] = []
    replace: dict[str, str] = {}
    keep, new_nodes = [], []
    for tensor in graph.initializer:
        name = checkpoint_name(tensor.name)
        if (
            tensor.data_type != onnx.TensorProto.FLOAT
            or not recipe.select.selects(name)
            or len(tensor.dims) < 2
        ):
            keep.append(tensor)
            continue
        weights = numpy_helper.to_array(tensor)
        if weights.ndim == 2:  # [in, out]: a scale per output column
            q, scale = quantize_int8(weights, reduce_axis=0)
            scale, attrs = scale.reshape(-1), {"axis": 1}
        else:  # [E, rows, cols]: a scale per expert and row
            q, scale = quantize_int8(weights, reduce_axis=2)
            attrs = {"axis": 2, "block_size": weights.shape[2]}
        keep += [
            numpy_helper.from_array(q, tensor.name + ".int8"),
            numpy_helper.from_array(scale, tensor.name + ".scale"),
        ]
        dq = tensor.name + ".dequantized"
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [tensor.name + ".int8", tensor.name + ".scale"],
                [dq],
                name=tensor.name + "/DequantizeLinear",
                **attrs,
            )
        )
        replace[tensor.name] = dq
        done.append(QuantizedTensor(name, tuple(weights.shape), weights.nbytes, q.nbytes + scale.nbytes))
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
