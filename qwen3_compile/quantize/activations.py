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
from qwen3_compile.export.graph import past_names
from qwen3_compile.quantize.calibrate import CalibrationStats
from qwen3_compile.quantize.weights import QUANT_MAX, checkpoint_name

_ZERO = {"int8": np.zeros((), np.int8), "fp8": np.zeros((), ml_dtypes.float8_e4m3fn)}
_SUFFIX = ".dequantized"


@dataclass
class _Plan:
    """Q/DQ pairs to insert: activation tensor -> (scale value, quantized dtype)."""

    float_dtype: np.dtype
    pairs: dict[str, tuple[float, str]] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def fake_quant(self, value: str, amax: float, dtype: str) -> str:
        if value in self.pairs:  # readers of one tensor share one range
            amax = max(amax, self.pairs[value][0] * QUANT_MAX[dtype])
        self.pairs[value] = (max(amax, 1e-12) / QUANT_MAX[dtype], dtype)
        return value + ".qdq"

    def constants(self, value: str) -> tuple[str, str]:
        scale, dtype = self.pairs[value]
        self.arrays[value + ".act_scale"] = np.array(scale, self.float_dtype)
        self.arrays[f"zero_point.{dtype}"] = _ZERO[dtype]
        return value + ".act_scale", f"zero_point.{dtype}"

    def nodes(self, value: str) -> list[onnx.NodeProto]:
        scale, zero = self.constants(value)
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
    rewired: dict[int, list[tuple[int, str]]] = {}  # node index -> (input slot, activation)
    expert_nodes = []
    for index, node in enumerate(model.graph.node):
        if act_dtype and node.op_type == "MatMul" and node.input[1].endswith(_SUFFIX):
            weight = checkpoint_name(node.input[1].removesuffix(_SUFFIX))
            amax = float(stats.act_amax(weight).max())
            plan.fake_quant(node.input[0], amax, act_dtype)
            rewired[index] = [(0, node.input[0])]
        elif (
            act_dtype
            and (node.domain, node.op_type) == (DOMAIN, EXPERT_DISPATCH)
            and node.input[2].endswith(_SUFFIX)
        ):
            gate_up = node.input[2].removesuffix(_SUFFIX)
            plan.fake_quant(node.input[0], float(stats.act_amax(gate_up).max()), act_dtype)
            rewired[index] = [(0, node.input[0])]
            expert_nodes.append((node, checkpoint_name(node.input[3].removesuffix(_SUFFIX))))
        elif kv_dtype and node.op_type == "Concat" and node.input[0].startswith("past_key_values."):
            layer = int(node.input[0].split(".")[1])
            s = stats.layers[layer]
            amax = s.key_amax if node.input[0] == past_names(layer)[0] else s.value_amax
            plan.fake_quant(node.input[1], amax, kv_dtype)
            rewired[index] = [(1, node.input[1])]
            counts["kv_cache_pairs"] += 1
    for node, down in expert_nodes:
        scale_name = down + ".act_scale"
        plan.arrays[scale_name] = np.array(
            max(float(stats.act_amax(down).max()), 1e-12) / QUANT_MAX[act_dtype], plan.float_dtype
        )
        plan.arrays[f"zero_point.{act_dtype}"] = _ZERO[act_dtype]
        node.op_type = QUANTIZED_EXPERT_DISPATCH
        node.input.extend([scale_name, f"zero_point.{act_dtype}"])
        counts["quantized_expert_dispatch"] += 1

    emitted: set[str] = set()
    nodes = []
    for index, node in enumerate(model.graph.node):
        for slot, value in rewired.get(index, []):
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
