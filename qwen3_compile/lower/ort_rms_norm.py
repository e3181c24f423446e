"""RMSNorm as the exporter writes it -> one ONNX Runtime `SimplifiedLayerNormalization` node.

The canonical graph spells RMSNorm out (`export/layers.py` `rms_norm`):

    [Cast(x, to=float)] -> Mul(x32, x32) -> ReduceMean(axes=[-1], keepdims=1) -> Add(., eps) -> Sqrt
    -> Reciprocal -> Mul(x32, inv_rms) -> [Cast(., to=T)] -> Mul(weight, .)

ORT does not fuse this form, so every norm costs about eight small kernels. `SimplifiedLayerNormalization`
is an ORT contrib op registered in the default ONNX domain (not com.microsoft; since_version 1), with
kernels for CPU and CUDA: inputs X (T) and scale (V), output Y (V), attributes axis, epsilon, stash_type;
y = x / sqrt(mean(x^2, axis..) + epsilon) * scale, the statistics in fp32 (stash_type=1). The rule writes
it with X in the graph's dtype, scale = the norm weight, axis=-1 and the graph's eps, its output taking
the scale Mul's output. fp16 graphs round once fewer (ORT scales before casting back; the canonical graph
casts, then multiplies in fp16).

The rule is anchored at the scale Mul; a near miss is reported at the ReduceMean, which the rewrite would
have removed, so the report names only norms that stayed unlowered.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

SIMPLIFIED_LAYER_NORM = "SimplifiedLayerNormalization"
# X/scale dtypes ORT's CPU and CUDA kernels take with fp32 statistics
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def register_onnx_schema() -> None:
    """Teach onnx's checker and shape inference the op (ORT registers it in the default domain, onnx does
    not know it), so a lowered graph passes the same checks as the others. Idempotent."""
    if onnx.defs.has(SIMPLIFIED_LAYER_NORM):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        SIMPLIFIED_LAYER_NORM,
        "",
        1,
        doc="ONNX Runtime's RMS normalization (an ORT contrib op in the default domain).",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "V")],
        outputs=[
            OpSchema.FormalParameter("Y", "V"),
            OpSchema.FormalParameter("inv_std_var", "U", param_option=optional),
        ],
        type_constraints=[
            ("T", floats, ""),
            ("U", ["tensor(float)", "tensor(double)"], ""),
            ("V", floats, ""),
        ],
        attributes=[
            OpSchema.Attribute("axis", OpSchema.AttrType.INT, required=False),
            OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, required=False),
            OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, required=False),
        ],
    )

    def infer(ctx) -> None:  # Y: X's shape, the scale's dtype
        x, scale = ctx.get_input_type(0), ctx.get_input_type(1)
        if x is None or scale is None or not scale.tensor_type.elem_type:
            return
        y = onnx.TypeProto()
        y.CopyFrom(x)
        y.tensor_type.elem_type = scale.tensor_type.elem_type
        ctx.set_output_type(0, y)

    schema.set_type_and_shape_inference_function(infer)
    onnx.defs.register_schema(schema)


register_onnx_schema()


class _Match:
    def __init__(self, x: str, weight: str, epsilon: float):
        self.x, self.weight, self.epsilon = x, weight, epsilon


def _op(view: GraphView, name: str, op_type: str) -> onnx.NodeProto | None:
    node = view.producers.get(name)
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _known_type(view: GraphView, name: str) -> int | None:
    """The element type of a value where the graph declares it (inputs, value_info, initializers)."""
    graph = view.model.graph
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.name == name and info.type.HasField("tensor_type"):
            return info.type.tensor_type.elem_type
    return view.elem_type(name)


class RmsNormToSimplifiedLayerNorm(RewriteRule):
    name = "rms_norm_to_simplified_layer_norm"
    # declines are reported at the norm's ReduceMean (see the module docstring)
    target_op = ("", "ReduceMean")

    def __init__(self) -> None:
        self._view: GraphView | None = None
        self._readers: Counter[str] = Counter()
        self._consumers: dict[str, list[onnx.NodeProto]] = {}

    def _index(self, view: GraphView) -> None:
        """How often each value is read (graph outputs count), once per pass over the graph."""
        if self._view is view:
            return
        self._view = view
        self._readers = Counter(i for n in view.model.graph.node for i in n.input)
        self._readers.update(o.name for o in view.model.graph.output)
        self._consumers = {}
        for n in view.model.graph.node:
            for i in set(n.input):
                self._consumers.setdefault(i, []).append(n)

    def _read_only_by_pattern(self, name: str, times: int = 1) -> bool:
        return self._readers[name] == times

    def match(self, view: GraphView, node: onnx.NodeProto) -> _Match | str:
        """The norm ending at the scale Mul `node`, or why it is not one ORT's op can take."""
        if node.op_type != "Mul" or node.domain != "" or len(node.input) != 2:
            return "not a Mul"
        self._index(view)
        weights = [i for i in node.input if i in view.initializers]
        if not weights:
            return "the scale Mul has no initializer weight"
        weight = weights[0]
        normalized = node.input[1] if node.input[0] == weight else node.input[0]
        weight_type = view.elem_type(weight)
        if weight_type not in _FLOAT_TYPES:
            return f"norm weight '{weight}' is not fp32, fp16 or bf16"
        if len(view.initializers[weight].dims) != 1:
            return f"norm weight '{weight}' is not one-dimensional"

        scaled = normalized
        cast_back = _op(view, normalized, "Cast")
        if cast_back is not None:
            if view.attrs(cast_back).get("to") != weight_type:
                return "the cast back does not produce the weight's dtype"
            if not self._read_only_by_pattern(normalized):
                return f"'{normalized}' is read outside the norm"
            scaled = cast_back.input[0]
        times_inv = _op(view, scaled, "Mul")
        if times_inv is None:
            return "the scale Mul does not multiply a normalized value"
        if not self._read_only_by_pattern(scaled):
            return f"'{scaled}' is read outside the norm"
        x32, inv_rms = times_inv.input
        if _op(view, inv_rms, "Reciprocal") is None:
            x32, inv_rms = inv_rms, x32
        reciprocal = _op(view, inv_rms, "Reciprocal")
        if reciprocal is None:
            return "not x * Reciprocal(Sqrt(...))"
        sqrt = _op(view, reciprocal.input[0], "Sqrt")
        add = _op(view, sqrt.input[0], "Add") if sqrt is not None else None
        if add is None:
            return "not Reciprocal(Sqrt(Add(variance, eps)))"
        eps_name = next((i for i in add.input if view.constant(i) is not None), None)
        if eps_name is None:
            return "eps is not a constant"
        eps = view.constant(eps_name)
        if eps.size != 1 or eps.dtype != np.float32:
            return "eps is not an fp32 scalar"
        variance = add.input[1] if add.input[0] == eps_name else add.input[0]
        mean = _op(view, variance, "ReduceMean")
        if mean is None:
            return "the variance is not a ReduceMean"
        reason = self._check_mean(view, mean)
        if reason:
            return reason
        square = _op(view, mean.input[0], "Mul")
        if square is None or list(square.input) != [x32, x32]:
            return "the ReduceMean does not average x * x of the normalized x"
        for value in (inv_rms, reciprocal.input[0], variance, add.output[0], mean.input[0]):
            if not self._read_only_by_pattern(value):
                return f"'{value}' is read outside the norm"

        x = x32
        cast_in = _op(view, x32, "Cast")
        if cast_back is not None:
            # the norm runs in fp32 on a T graph: X is the Cast's input, of the weight's dtype
            if cast_in is None or view.attrs(cast_in).get("to") != TensorProto.FLOAT:
                return "the fp32 statistics are not taken of a Cast to fp32"
            x = cast_in.input[0]
            known = _known_type(view, x)
            if known is not None and known != weight_type:
                return f"'{x}' does not have the norm weight's dtype"
        elif weight_type != TensorProto.FLOAT:
            return "statistics of a non-fp32 value (no Cast to fp32)"
        return _Match(x, weight, float(eps.reshape(())))

    @staticmethod
    def _check_mean(view: GraphView, mean: onnx.NodeProto) -> str | None:
        attrs = view.attrs(mean)
        if attrs.get("keepdims", 1) != 1:
            return "the ReduceMean does not keep dims"
        if attrs.get("noop_with_empty_axes", 0):
            return "the ReduceMean has noop_with_empty_axes"
        if len(mean.input) > 1 and mean.input[1]:
            axes = view.constant(mean.input[1])
            if axes is None:
                return "the ReduceMean's axes are not a constant"
            axes = axes.reshape(-1).tolist()
        else:
            axes = attrs.get("axes")
        if axes != [-1]:
            return f"the ReduceMean's axes are {axes}, not [-1]"
        return None

    def _scale_mul(self, view: GraphView, mean: onnx.NodeProto) -> onnx.NodeProto | str:
        """Forward from a ReduceMean along single readers to the norm's scale Mul."""
        self._index(view)
        node = mean
        for expected in ("Add", "Sqrt", "Reciprocal", "Mul", "Cast|Mul", "Mul"):
            readers = self._consumers.get(node.output[0], [])
            if len(readers) != 1:
                return f"'{node.output[0]}' is read by {len(readers)} nodes, not only the norm"
            node = readers[0]
            if node.op_type not in expected.split("|"):
                return f"not an RMSNorm: {node.op_type} '{node.name}' where {expected} was expected"
            if expected == "Cast|Mul" and node.op_type == "Mul":
                break
        return node

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if node.op_type == "ReduceMean" and node.domain == "":
            tail = self._scale_mul(view, node)
            if isinstance(tail, str):
                return tail
            found = self.match(view, tail)
            if isinstance(found, str):
                return found
            return f"lowered at its scale Mul '{tail.name}'"
        found = self.match(view, node)
        return found if isinstance(found, str) else None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        found = self.match(view, node)
        assert not isinstance(found, str), found
        norm = helper.make_node(
            SIMPLIFIED_LAYER_NORM,
            [found.x, found.weight],
            [node.output[0]],
            name=f"{node.name}/{SIMPLIFIED_LAYER_NORM}",
            axis=-1,
            epsilon=found.epsilon,
            stash_type=1,
        )
        return Replacement([norm])
