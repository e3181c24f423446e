"""Graph rewrites as small rules: a check that says why a node does not match, and a replacement.

A `RewriteRule` looks at one node at a time. `check` returns None when the rule applies, else a short
reason (reported, so a user sees why a custom node stayed unlowered). `rewrite` returns the nodes that
replace it and any new initializers; the engine removes initializers and functions nothing uses anymore.
A rewrite that fuses a pattern with several outputs (attention: its output and the present key/value)
names the other nodes it takes over in `supersedes`; the engine drops them, their readers then read the
replacement's outputs of the same names.
Rule sets are ordered lists per backend target; `apply_rules` reports how many rewrites each rule made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qwen3_compile.storage.external_data import ExternalDataWriter, external_array


@dataclass
class Replacement:
    nodes: list[onnx.NodeProto]
    # new weights by name; the engine stores them inline or appends them to the external data file
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    opsets: dict[str, int] = field(default_factory=dict)
    # names of other nodes whose outputs `nodes` now produce: the engine drops them
    supersedes: tuple[str, ...] = ()
    # entries for the model's metadata_props: what a runner must know of the lowering (GQA's cache limit)
    metadata: dict[str, str] = field(default_factory=dict)
    # model-local functions the new nodes call (added once per domain and name)
    functions: list[onnx.FunctionProto] = field(default_factory=list)


class GraphView:
    """Read access a rule needs: initializers by name, node attributes."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None):
        self.model = model
        self.base_dir = base_dir
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producers = {o: n for n in model.graph.node for o in n.output}

    def array(self, name: str) -> np.ndarray | None:
        """The initializer's values; a read-only view of its bytes (no copy) when stored inline."""
        tensor = self.initializers.get(name)
        if tensor is None:
            return None
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return external_array(tensor, self.base_dir)
        if tensor.raw_data and tensor.data_type == onnx.TensorProto.FLOAT:
            return np.frombuffer(tensor.raw_data, dtype=np.float32).reshape(tuple(tensor.dims))
        return numpy_helper.to_array(tensor)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output."""
        value = self.array(name)
        if value is not None:
            return np.asarray(value)
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and node.domain == "":
            attrs = self.attrs(node)
            if "value" in attrs:
                return numpy_helper.to_array(attrs["value"])
        return None

    def producer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The default-domain `op_type` node that computes `name`, if that is what computes it."""
        node = self.producers.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node

    def elem_type(self, name: str) -> int | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else tensor.data_type

    @staticmethod
    def attrs(node: onnx.NodeProto) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class RewriteRule:
    name = "rule"
    # lowering options the constructor takes by keyword (`lower.make_rules` passes them), e.g. max_positions
    options: tuple[str, ...] = ()

    def reports(self, view: GraphView, node: onnx.NodeProto) -> bool:
        """Whether a decline of `node` is worth reporting: by default, any node of the op(s) the rule
        targets. A rule whose op is common (MatMul) narrows this to the nodes it is meant for."""
        return (node.domain, node.op_type) in _declinable_ops(self)

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        raise NotImplementedError

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        raise NotImplementedError


@dataclass(frozen=True)
class RewriteReport:
    applied: dict[str, int]
    # rule name -> reasons it declined nodes of the op it targets that no other rule rewrote
    declined: dict[str, list[str]]
    # rule name -> {node name: why} for every node of its op it declined, including those a later rule
    # then rewrote (a fallback): what a caller needs to say which lowering each node got
    declined_nodes: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"applied": self.applied, "declined": self.declined}


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing reads (e.g. a DequantizeLinear a rewrite bypassed), then the
    initializers and local functions no node uses any more."""
    graph = model.graph
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        live = [n for n in graph.node if any(o in read for o in n.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    called = {(n.domain, n.op_type) for n in graph.node}
    functions = [f for f in model.functions if (f.domain, f.name) in called]
    del model.functions[:]
    model.functions.extend(functions)
    domains = {n.domain for n in graph.node} | {""}
    imports = [o for o in model.opset_import if o.domain in domains or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(imports)


def _drop_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    keep = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _declinable_ops(rule: RewriteRule) -> tuple[tuple[str, str], ...]:
    """The ops whose declines a rule reports: `target_ops` if it names several, else its `target_op`."""
    several = getattr(rule, "target_ops", ())
    one = getattr(rule, "target_op", None)
    return tuple(several) or ((one,) if one else ())


def apply_rules(
    model: onnx.ModelProto,
    rules: list[RewriteRule],
    base_dir: Path | None = None,
    weight_sink: ExternalDataWriter | None = None,
) -> RewriteReport:
    """Apply `rules` in order to every node (in place). A weight that a rewrite replaced is dropped right
    away, so lowering a large model holds the old and the new form of one layer at a time, not all.
    External-data models: `base_dir` locates the data file, new weights are appended through the sink."""
    applied: Counter[str] = Counter()
    declined: dict[str, list[tuple[onnx.NodeProto, str]]] = {}
    for rule in rules:
        view = GraphView(model, base_dir)
        uses = Counter(i for n in model.graph.node for i in n.input)
        new_nodes: list[onnx.NodeProto] = []
        superseded: set[str] = set()
        for node in model.graph.node:
            reason = rule.check(view, node)
            if reason is None:
                replacement = rule.rewrite(view, node)
                new_nodes.extend(replacement.nodes)
                superseded.update(replacement.supersedes)
                created = [
                    weight_sink.add(n, a) if weight_sink is not None else numpy_helper.from_array(a, n)
                    for n, a in replacement.arrays.items()
                ]
                model.graph.initializer.extend(created)
                view.initializers.update({t.name: t for t in created})
                uses.subtract(node.input)
                uses.update(i for n in replacement.nodes for i in n.input)
                released = {i for i in node.input if uses[i] <= 0 and i in view.initializers}
                if released:
                    _drop_initializers(model, released)
                    for name in released:
                        del view.initializers[name]
                if replacement.metadata:
                    props = {p.key: p.value for p in model.metadata_props} | replacement.metadata
                    onnx.helper.set_model_props(model, props)
                for domain, version in replacement.opsets.items():
                    if all(o.domain != domain for o in model.opset_import):
                        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
                for fn in replacement.functions:
                    if all((f.domain, f.name) != (fn.domain, fn.name) for f in model.functions):
                        model.functions.append(fn)
                applied[rule.name] += 1
                continue
            if rule.reports(view, node):
                declined.setdefault(rule.name, []).append((node, reason))
            new_nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(n for n in new_nodes if n.name not in superseded)
    _prune(model)
    remaining = {(n.name, n.domain, n.op_type) for n in model.graph.node}
    unlowered = {
        rule: [f"{n.name}: {why}" for n, why in items if (n.name, n.domain, n.op_type) in remaining]
        for rule, items in declined.items()
    }
    every = {rule: {n.name: why for n, why in items} for rule, items in declined.items()}
    return RewriteReport(dict(applied), {rule: items for rule, items in unlowered.items() if items}, every)
