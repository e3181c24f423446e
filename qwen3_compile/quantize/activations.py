"""Static activation quantization (W8A8) and the FP8 KV cache as Q/DQ pairs in the graph.

Every MatMul that reads a quantized weight gets `DequantizeLinear(QuantizeLinear(x))` on its activation
input, one pair per activation tensor (q/k/v share theirs) with a per-tensor scale: calibrated absmax /
qmax (127 for INT8, 448 for E4M3), zero point 0 of the quantized type. ExpertDispatch nodes with
quantized experts get the pair on their hidden input and become `QuantizedExpertDispatch`, which
quantizes the expert intermediate inside with its own shared scale. The FP8 KV cache puts a pair on
each layer's new key and value before they join the cache, so the cache holds E4M3 values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, QUANTIZED_EXPERT_DISPATCH, function
from qwen3_compile.graph_contract import past_names
from qwen3_compile.quantize.calibrate import CalibrationStats
from qwen3_compile.quantize.weights import QUANT_MAX, dequantized_source

_ZERO = {"int8": np.zeros((), np.int8), "fp8": np.zeros((), ml_dtypes.float8_e4m3fn)}


def activation_scale(amax: float, dtype: str, float_dtype: np.dtype) -> np.ndarray:
    """A per-tensor activation (or KV-cache) scale as the graph stores it."""
    return np.array(max(amax, 1e-12) / QUANT_MAX[dtype], float_dtype)


@dataclass
class _Plan:
    """Q/DQ pairs to insert: activation tensor -> (absmax over its readers, quantized dtype)."""

    float_dtype: np.dtype
    ranges: dict[str, tuple[float, str]] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def observe(self, value: str, amax: float, dtype: str) -> None:
        """Readers of one tensor (q/k/v) share one range: the widest."""
        self.ranges[value] = (max(amax, self.ranges.get(value, (0.0, dtype))[0]), dtype)

    def constant(self, name: str, amax: float, dtype: str) -> tuple[str, str]:
        """A scale initializer and the zero point of `dtype` (which fixes QuantizeLinear's output type)."""
        self.arrays[name] = activation_scale(amax, dtype, self.float_dtype)
        self.arrays[f"zero_point.{dtype}"] = _ZERO[dtype]
        return name, f"zero_point.{dtype}"

    def nodes(self, value: str) -> list[onnx.NodeProto]:
        scale, zero = self.constant(value + ".act_scale", *self.ranges[value])
        return [
            helper.make_node(
                "QuantizeLinear", [value, scale, zero], [value + ".q"], name=value + "/Quantize"
            ),
            helper.make_node(
                "DequantizeLinear", [value + ".q", scale], [value + ".qdq"], name=value + "/Dequantize"
            ),
        ]


def insert_activation_qdq(
    model: onnx.ModelProto,
    stats: CalibrationStats,
    act_dtype: str | None,
    kv_dtype: str | None,
    float_dtype: type = np.float32,
) -> dict[str, int]:
    """Rewrite `model` in place (after `quantize_weights`); returns counts for the manifest. `float_dtype`
    is the export's activation type (the scales must match it: QuantizeLinear's x and y_scale share a
    type, and a strongly typed TensorRT network takes the types as written)."""
    plan = _Plan(np.dtype(float_dtype))
    counts = {"activation_pairs": 0, "quantized_expert_dispatch": 0, "kv_cache_pairs": 0}
    rewired: dict[int, tuple[int, str]] = {}  # node index -> (input slot, activation)
    for index, node in enumerate(model.graph.node):
        if act_dtype and node.op_type == "MatMul" and (weight := dequantized_source(node.input[1])):
            plan.observe(node.input[0], float(stats.act_amax(weight).max()), act_dtype)
            rewired[index] = (0, node.input[0])
        elif (
            act_dtype
            and (node.domain, node.op_type) == (DOMAIN, EXPERT_DISPATCH)
            and dequantized_source(node.input[2])
        ):
            gate_up, down = (dequantized_source(v) for v in node.input[2:4])
            plan.observe(node.input[0], float(stats.act_amax(gate_up).max()), act_dtype)
            rewired[index] = (0, node.input[0])
            # the intermediate is quantized inside the node, with one range shared by all experts
            node.op_type = QUANTIZED_EXPERT_DISPATCH
            node.input.extend(
                plan.constant(down + ".act_scale", float(stats.act_amax(down).max()), act_dtype)
            )
            counts["quantized_expert_dispatch"] += 1
        elif kv_dtype and node.op_type == "Concat" and node.input[0].startswith("past_key_values."):
            layer = int(node.input[0].split(".")[1])
            s = stats.layers[layer]
            amax = s.key_amax if node.input[0] == past_names(layer)[0] else s.value_amax
            plan.observe(node.input[1], amax, kv_dtype)
            rewired[index] = (1, node.input[1])
            counts["kv_cache_pairs"] += 1

    emitted: set[str] = set()
    nodes = []
    for index, node in enumerate(model.graph.node):
        if index in rewired:
            slot, value = rewired[index]
            if value not in emitted:
                nodes += plan.nodes(value)
                emitted.add(value)
            node.input[slot] = value + ".qdq"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in sorted(plan.arrays.items()))
    counts["activation_pairs"] = len(emitted) - counts["kv_cache_pairs"]
    if counts["quantized_expert_dispatch"]:
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        model.functions.append(function(QUANTIZED_EXPERT_DISPATCH, opset))
    return counts
