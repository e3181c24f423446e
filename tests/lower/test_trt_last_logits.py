"""Deployment graphs with last-position logits: ONNX Runtime before and after (the last row and the KV cache
must be what the full graph computes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qwen3_compile.backends.base import left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.lower import lower


@pytest.mark.parametrize("preset, dtype", [("tiny-dense", "fp32"), ("tiny-moe", "fp16")])
def test_last_position_logits(artifacts, tmp_path, preset, dtype):
    exported = artifacts.exported(preset, dtype)  # shared: rewritten in memory, saved to tmp_path
    model = onnx.load(str(exported.model_path))
    report = lower(model, "trt-last-logits")
    assert report.applied == {"last_position_logits": 1}
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    logits_dims = next(o for o in inferred.graph.output if o.name == "logits").type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in logits_dims] == ["batch_size", 1, 151936]
    lowered = tmp_path / "last.onnx"
    onnx.save(model, str(lowered))

    rng = np.random.default_rng()
    batch = left_padded_batch([list(rng.integers(0, 151000, size=n)) for n in (13, 6)], pad_id=151643)
    full, last = OrtRunner(exported.model_path), OrtRunner(lowered)
    for step in range(3):  # prefill, then decode steps through each graph's own cache
        if step == 0:
            feeds = (batch.input_ids, batch.attention_mask, batch.position_ids)
            cache_full, cache_last = full.empty_cache(2), last.empty_cache(2)
        logits_full, cache_full = full.forward(*feeds, cache_full)
        logits_last, cache_last = last.forward(*feeds, cache_last)
        assert logits_last.shape == (2, 1, 151936)
        np.testing.assert_allclose(logits_last[:, 0], logits_full[:, -1], atol=1e-5, rtol=0)
        for a, b in zip(cache_last, cache_full, strict=True):
            np.testing.assert_array_equal(a, b)
        token = logits_full[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([feeds[1], np.ones((2, 1), dtype=np.int64)], axis=1)
        feeds = (token.astype(np.int64), mask, feeds[2][:, -1:] + 1)
