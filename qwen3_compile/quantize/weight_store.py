"""Reading an artifact's weights one tensor at a time and writing the quantized ones the same way.

A large export keeps its weights in external data: `WeightStore` memory-maps each tensor on demand and
the output goes through an `ExternalDataWriter` as it is produced, so quantizing holds one tensor (one
layer's experts at most) in memory, not the model. Small exports stay inline in the protobuf.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qwen3_compile.lower.rules import GraphView
from qwen3_compile.storage.external_data import ExternalDataWriter


class WeightStore(GraphView):
    """The lowering rules' view of the initializers, plus what quantizing asks of it: whether the tensors
    live in external data, and a KeyError (not None) for a name that is not an initializer."""

    def __contains__(self, name: str) -> bool:
        return name in self.initializers

    def is_external(self, name: str) -> bool:
        return self.initializers[name].data_location == onnx.TensorProto.EXTERNAL

    def array(self, name: str) -> np.ndarray:
        """The tensor's values: a read-only memory map for external data, else decoded from the proto."""
        if name not in self.initializers:
            raise KeyError(name)
        return super().array(name)

    @property
    def streamed(self) -> bool:
        return any(self.is_external(n) for n in self.initializers)


class InlineSink:
    """The small-model sink: tensors stay in the protobuf."""

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(array), name)

    def close(self) -> None:
        pass


def open_sink(store: WeightStore, data_file: Path) -> ExternalDataWriter | InlineSink:
    """External data out when external data came in (the layout the export chose), else inline."""
    return ExternalDataWriter(data_file) if store.streamed else InlineSink()
