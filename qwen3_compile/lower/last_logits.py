"""Deployment graphs: logits for the last position only (`build --logits last`, `lower --logits last`).

The validation graph returns logits at every position so parity can be checked everywhere; generation reads
only the last row. At a 4096-token prefill the full logits are 4096 x 151936 fp32 = 2.5 GB per sequence and
the vocabulary projection does 4096x the work it needs. The rule slices the hidden states to the last
position in front of `lm_head` (inputs are left-padded, so the last position is every row's newest token):
`logits` becomes [batch, 1, vocab]. The KV cache outputs are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

LOGITS = "logits"
_PASS_THROUGH = ("Cast", "Identity")


def lm_head_matmul(view: GraphView) -> onnx.NodeProto | None:
    """The MatMul whose output reaches the graph output `logits` through Cast/Identity only."""
    node = view.producers.get(LOGITS)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = view.producers.get(node.input[0])
    return node if node is not None and node.op_type == "MatMul" else None


class LastPositionLogits(RewriteRule):
    name = "last_position_logits"

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if node.op_type != "MatMul" or lm_head_matmul(view) is not node:
            return "not the lm_head MatMul"
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        hidden = node.input[0]
        p = f"{node.name}/last_position"
        constants = {
            f"{p}/starts": np.array([-1], dtype=np.int64),
            f"{p}/ends": np.array([np.iinfo(np.int64).max], dtype=np.int64),
            f"{p}/axes": np.array([1], dtype=np.int64),
        }
        nodes = [
            helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))
            for name, value in constants.items()
        ]
        nodes.append(helper.make_node("Slice", [hidden, *constants], [f"{p}/hidden"], name=f"{p}/slice"))
        matmul = onnx.NodeProto()
        matmul.CopyFrom(node)
        matmul.input[0] = f"{p}/hidden"
        nodes.append(matmul)
        for (
            output
        ) in view.model.graph.output:  # declared [batch, sequence_length, vocab] -> [batch, 1, vocab]
            if output.name == LOGITS:
                output.type.tensor_type.shape.dim[1].Clear()
                output.type.tensor_type.shape.dim[1].dim_value = 1
        return Replacement(nodes)
