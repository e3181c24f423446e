"""Quantizing an external-data export reads and writes one tensor at a time: the result computes exactly
what the in-memory path gives on the same model (W8A8 with SmoothQuant, INT8 lowered to QMoE, packed INT4)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qwen3_compile.backends.base import left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.export.stage import export_onnx
from qwen3_compile.lower.stage import lower_artifact
from qwen3_compile.quantize.stage import quantize_artifact
from qwen3_compile.storage import artifact_dir as artifact_io


def _logits(directory, batch) -> np.ndarray:
    runner = OrtRunner(directory / "model.onnx")
    return runner.forward(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(2))[0]


@pytest.fixture(scope="module")
def exports(artifacts, tmp_path_factory):
    """tiny-moe exported inline (the shared export, read-only) and with its weights as external data."""
    inline = artifacts.export("tiny-moe")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifact_io, "EXTERNAL_DATA_THRESHOLD", 0)
        external = export_onnx("tiny-moe", tmp_path_factory.mktemp("streamed") / "external").directory
    return inline, external


@pytest.mark.parametrize("recipe, target", [("int8-sq", None), ("int8-wo", "ort"), ("int4-rtn", None)])
def test_streamed_quantize_equals_in_memory(recipe, target, exports, tmp_path):
    if recipe == "int4-rtn":  # packed INT4 written through the external-data sink; 32 fits tiny-moe
        from qwen3_compile.quantize.recipe import load_recipe, with_group_size

        recipe = with_group_size(load_recipe(recipe), 32)
    inline, external = exports
    assert (external / "model.onnx.data").exists() and not (inline / "model.onnx.data").exists()
    a = quantize_artifact(inline, recipe, tmp_path / "qa", samples=8)
    b = quantize_artifact(external, recipe, tmp_path / "qb", samples=8)
    if target is not None:  # the lowered copy of an external-data artifact keeps its data external
        a = lower_artifact(a.directory, tmp_path / "la", target)
        b = lower_artifact(b.directory, tmp_path / "lb", target)
    assert (b.directory / "model.onnx.data").stat().st_size > 10e6  # the weights went out as data
    proto = onnx.load(str(b.directory / "model.onnx"), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer) > 10
    assert a.manifest.calibration == b.manifest.calibration
    rng = np.random.default_rng()
    batch = left_padded_batch([rng.integers(0, 151643, 7).tolist(), rng.integers(0, 151643, 3).tolist()], 0)
    np.testing.assert_array_equal(_logits(a.directory, batch), _logits(b.directory, batch))
