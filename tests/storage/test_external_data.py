"""External-data tensors written by ExternalDataWriter and read back memory-mapped (external_array), for
the packed 4-bit types too: INT4 sign-extends, UINT4 does not. Against the arrays written, and against
ONNX's own reader (onnx.load with its external data)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.storage.external_data import ExternalDataWriter, external_array


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [(ml_dtypes.int4, -8, 8), (ml_dtypes.uint4, 0, 16), (np.uint8, 0, 256), (np.float32, -1, 1)],
)
def test_written_tensor_reads_back(tmp_path, dtype, low, high):
    rng = np.random.default_rng()
    shape = (67, 33)  # odd count: the last 4-bit byte is half padding
    if np.dtype(dtype).kind == "f":
        values = rng.uniform(low, high, shape).astype(dtype)
    else:
        values = rng.integers(low, high, shape).astype(dtype)
    writer = ExternalDataWriter(tmp_path / "weights.bin")
    proto = writer.add("w", values)
    writer.close()
    assert proto.data_location == TensorProto.EXTERNAL
    got = external_array(proto, tmp_path)
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    np.testing.assert_array_equal(got.astype(np.float64), values.astype(np.float64))

    output = helper.make_tensor_value_info("w", proto.data_type, shape)
    graph = helper.make_graph([], "g", [], [output], [proto])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    (loaded,) = onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(loaded).astype(np.float64), values.astype(np.float64))
