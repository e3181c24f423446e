"""ExpertDispatch (and QuantizedExpertDispatch) -> its reference body as plain ONNX ops (every expert
computed densely), for TensorRT targets without a sparse MoE kernel.

TensorRT's parser can inline the local function itself, but it names each inlined node after the function
body (`node_of_weighted` ...), so the second MoE layer's nodes collide with the first's ("output tensors of
this new instance will not be queryable") and layer outputs cannot be marked for debugging. This rule
inlines the body with names prefixed by the ExpertDispatch node's name and the attribute references
(`@top_k`, `@normalize`) resolved, so the graph TensorRT sees has unique, traceable names.
"""

from __future__ import annotations

import onnx

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, function
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule


def _function_for(view: GraphView, node: onnx.NodeProto) -> onnx.FunctionProto | None:
    for fn in view.model.functions:
        if (fn.domain, fn.name) == (node.domain, node.op_type):
            return fn
    if node.op_type != EXPERT_DISPATCH:
        return None
    opset = next(o.version for o in view.model.opset_import if o.domain in ("", "ai.onnx"))
    return function(node.op_type, opset)


def _resolve_attributes(body_node: onnx.NodeProto, call_attrs: dict[str, onnx.AttributeProto]) -> None:
    """Replace `attr = @name` references by the call site's values (in place)."""
    resolved = []
    for attr in body_node.attribute:
        if attr.ref_attr_name:
            value = call_attrs.get(attr.ref_attr_name)
            if value is None:
                continue  # not given at the call site and no default: ONNX drops the attribute
            concrete = onnx.AttributeProto()
            concrete.CopyFrom(value)
            concrete.name = attr.name
            resolved.append(concrete)
        else:
            resolved.append(attr)
    del body_node.attribute[:]
    body_node.attribute.extend(resolved)


def inline_call(view: GraphView, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The body of the local function `node` calls, with unique value and node names."""
    fn = _function_for(view, node)
    call_attrs = {a.name: a for a in node.attribute}
    for attr in fn.attribute_proto:  # defaults declared by the function
        call_attrs.setdefault(attr.name, attr)
    prefix = node.name or f"{node.op_type}_{node.output[0]}"
    names = dict(zip(fn.input, node.input, strict=False)) | dict(zip(fn.output, node.output, strict=True))

    def rename(value: str) -> str:
        if not value:
            return value
        return names.setdefault(value, f"{prefix}/{value}")

    nodes = []
    for body_node in fn.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(body_node)
        copy.name = f"{prefix}/{body_node.name or body_node.output[0]}"
        copy.input[:] = [rename(v) for v in body_node.input]
        copy.output[:] = [rename(v) for v in body_node.output]
        _resolve_attributes(copy, call_attrs)
        nodes.append(copy)
    return nodes


class ExpertDispatchToDenseExperts(RewriteRule):
    name = "expert_dispatch_to_dense_experts"
    target_op = (DOMAIN, EXPERT_DISPATCH)

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if node.domain != DOMAIN:
            return "not a qwen3_compile node"
        if _function_for(view, node) is None:
            return f"{node.op_type} has no function body in the model"
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        return Replacement(inline_call(view, node))
