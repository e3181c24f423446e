"""A small ONNX graph builder: named scopes, deduplicated constants, weights as raw bytes.

The exporter writes Qwen3 as explicit ONNX ops through this builder instead of tracing a torch
program: the graph is exactly what the layer functions say, node names are stable (so exports are
byte-deterministic), and a layer's graph can be produced without materialising the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from qwen3_compile.graph_contract import ONNX_DTYPES


def tensor_proto(name: str, tensor: Any) -> TensorProto:
    """An initializer from a torch tensor or numpy array, stored as raw little-endian bytes."""
    if hasattr(tensor, "detach"):  # torch.Tensor: go through raw bytes so bfloat16 works too
        import torch

        t = tensor.detach().contiguous().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        view = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}.get(t.dtype, t.dtype)
        raw = t.view(view).numpy().tobytes()
        dims = list(t.shape)
    else:
        arr = np.ascontiguousarray(tensor)
        dtype, raw, dims = str(arr.dtype), arr.tobytes(), list(arr.shape)
    proto = TensorProto(name=name, data_type=ONNX_DTYPES[dtype], dims=dims)
    proto.raw_data = raw
    return proto


class GraphBuilder:
    """Accumulates nodes, initializers and value names for one ONNX graph."""

    def __init__(self, float_type: int = TensorProto.FLOAT, weight_sink: Any = None):
        self.float_type = float_type
        # an ExternalDataWriter: weights go straight to the data file instead of the protobuf
        self.weight_sink = weight_sink
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = []
        self._counts: dict[str, int] = {}
        self._constants: dict[tuple, str] = {}
        self.opsets: dict[str, int] = {}

    # ---- naming ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _unique(self, hint: str) -> str:
        base = "/".join([*self._scope, hint]) if self._scope else hint
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # ---- graph pieces ----------------------------------------------------------------------------

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        """Expose `value` as graph output `name` (renaming through Identity when needed)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self._unique(name)))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def weight(self, name: str, tensor: Any) -> str:
        """A named initializer (the checkpoint's tensor name, so tools can map weights back)."""
        sink = self.weight_sink
        self.initializers.append(sink.add(name, tensor) if sink is not None else tensor_proto(name, tensor))
        return name

    def add_initializer(self, proto: TensorProto) -> str:
        """An initializer a weight source prepared itself (streamed into the sink in pieces)."""
        self.initializers.append(proto)
        return proto.name

    def const(self, value: Any, dtype: str = "int64") -> str:
        """A small constant initializer, shared by every use of the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._constants:
            name = f"const/{dtype}/" + "_".join(str(v) for v in arr.reshape(-1)[:8]).replace("-", "m")
            if arr.size > 8 or name in self._constants.values():
                name += f"/n{len(self._constants)}"
            self.initializers.append(tensor_proto(name, arr))
            self._constants[key] = name
        return self._constants[key]

    def float_const(self, value: float) -> str:
        """A scalar constant in the graph's compute float type."""
        import ml_dtypes

        dtype = {
            TensorProto.FLOAT: "float32",
            TensorProto.FLOAT16: "float16",
            TensorProto.BFLOAT16: ml_dtypes.bfloat16,
        }[self.float_type]
        return self.const(np.asarray(value, dtype=dtype), str(np.dtype(dtype)))

    def op(
        self,
        op_type: str,
        *inputs: str | None,
        outputs: int = 1,
        domain: str = "",
        hint: str | None = None,
        **attrs: Any,
    ) -> Any:
        """Append one node; returns its output name (or a tuple when `outputs` > 1)."""
        name = self._unique(hint or op_type)
        outs = [f"{name}/out{i}" if outputs > 1 else f"{name}/out" for i in range(outputs)]
        ins = ["" if i is None else i for i in inputs]
        self.nodes.append(helper.make_node(op_type, ins, outs, name=name, domain=domain or None, **attrs))
        return tuple(outs) if outputs > 1 else outs[0]

    def make_model(
        self,
        name: str,
        opset: int,
        functions: Sequence[onnx.FunctionProto] = (),
        producer: str = "qwen3-compile",
        version: str = "",
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)
        imports = [helper.make_opsetid("", opset)]
        imports += [helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())]
        model = helper.make_model(
            graph,
            opset_imports=imports,
            functions=list(functions),
            producer_name=producer,
            producer_version=version,
        )
        model.ir_version = 10
        return model
