"""Graph signatures: inputs, outputs and the op histogram of an ONNX graph, for golden-file tests that
flag unintended graph changes (graphs/signatures/*.json)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx


def _value_info(v: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = v.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": v.name, "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type), "shape": dims}


def graph_signature(model: onnx.ModelProto) -> dict[str, Any]:
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)
    return {
        "opset_imports": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "op_histogram": dict(sorted(ops.items())),
        "functions": sorted(f"{f.domain}::{f.name}" for f in model.functions),
        "initializers": len(model.graph.initializer),
    }
