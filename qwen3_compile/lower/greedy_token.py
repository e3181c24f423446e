"""ONNX Runtime deployment graphs: the greedy token picked in the graph (`lower --for ort --logits last`).

A decode loop that only wants the greedy token would otherwise copy the whole logits row to the host each
step (151936 fp32 values, 608 KB) and scan it there twice (NaN check, argmax): about 0.1 ms of host work
per token while the GPU waits (docs/gpu.md). The rule adds two outputs computed on the device from the
last-position logits, which `OrtRunner.forward_greedy` copies instead (a few bytes):

- `next_token` [batch, 1] int64: ArgMax over the vocabulary, the lowest index on ties (numpy's argmax).
- `logits_nan` [batch, 1] bool: whether the row holds a NaN (its sum is NaN), the check `run` makes on
  host logits, so a broken artifact still fails loudly instead of emitting token 0.

`logits` stays an output (sampling reads it; a greedy loop leaves it on the device).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.graph_contract import LOGITS_NAN, NEXT_TOKEN
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

LOGITS = "logits"


def _logits_output(view: GraphView) -> onnx.ValueInfoProto | None:
    return next((o for o in view.model.graph.output if o.name == LOGITS), None)


class GreedyToken(RewriteRule):
    name = "greedy_token"

    def reports(self, view: GraphView, node: onnx.NodeProto) -> bool:
        return LOGITS in node.output

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if LOGITS not in node.output:
            return "not the node that writes the logits"
        output = _logits_output(view)
        dims = output.type.tensor_type.shape.dim if output is not None else []
        if len(dims) != 3 or dims[1].dim_value != 1:
            return "the logits cover every position (the greedy token needs --logits last)"
        if any(o.name in (NEXT_TOKEN, LOGITS_NAN) for o in view.model.graph.output):
            return "the graph already has a greedy-token output"
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        p = "greedy_token"
        axes, last = f"{p}/axes", np.array([-1], np.int64)
        nodes = [
            kept,
            helper.make_node("Constant", [], [axes], name=axes, value=numpy_helper.from_array(last, axes)),
            helper.make_node(
                "ArgMax", [LOGITS], [NEXT_TOKEN], name=f"{p}/argmax", axis=-1, keepdims=0, select_last_index=0
            ),
            helper.make_node("ReduceSum", [LOGITS, axes], [f"{p}/sum"], name=f"{p}/sum", keepdims=0),
            helper.make_node("IsNaN", [f"{p}/sum"], [LOGITS_NAN], name=f"{p}/isnan"),
        ]
        batch = _logits_output(view).type.tensor_type.shape.dim[0]
        batch_dim = batch.dim_param or batch.dim_value
        view.model.graph.output.extend(
            [
                helper.make_tensor_value_info(NEXT_TOKEN, TensorProto.INT64, [batch_dim, 1]),
                helper.make_tensor_value_info(LOGITS_NAN, TensorProto.BOOL, [batch_dim, 1]),
            ]
        )
        return Replacement(nodes)
