"""ExpertDispatch inlined as plain ops (TensorRT's dense MoE lowering): ONNX Runtime before and after."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qwen3_compile.backends.base import generate, left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.lower import lower


@pytest.fixture(scope="module")
def moe_export(artifacts):
    return artifacts.exported("tiny-moe")


def _lowered(model_path, tmp_path):
    model = onnx.load(str(model_path))
    report = lower(model, "trt-dense")
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out = tmp_path / "lowered.onnx"
    onnx.save(model, str(out))
    return model, report, out


def test_dense_lowering_matches_function_body(moe_export, tmp_path):
    model, report, lowered = _lowered(moe_export.model_path, tmp_path)
    assert report.applied == {"expert_dispatch_to_dense_experts": 2} and not report.declined
    assert not model.functions and all(n.domain == "" for n in model.graph.node)
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))  # TensorRT's own inlining repeats names across layers
    values = [o for n in model.graph.node for o in n.output]
    assert len(values) == len(set(values))

    rng = np.random.default_rng()
    prompts = [list(rng.integers(0, 151000, size=n)) for n in (11, 5, 8)]
    batch = left_padded_batch(prompts, pad_id=151643)
    before = generate(OrtRunner(moe_export.model_path), batch, steps=4)
    after = generate(OrtRunner(lowered), batch, steps=4)
    mask = batch.attention_mask.astype(bool)
    np.testing.assert_allclose(after.prefill_logits[mask], before.prefill_logits[mask], atol=1e-5, rtol=0)
    for a, b in zip(after.step_logits, before.step_logits, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(after.tokens, before.tokens)


def test_dense_lowering_keeps_attribute_values(moe_export, tmp_path):
    model, _, _ = _lowered(moe_export.model_path, tmp_path)
    constants = {
        n.name.rsplit("/", 1)[-1]: (n.attribute[0].name, onnx.helper.get_attribute_value(n.attribute[0]))
        for n in model.graph.node
        if n.op_type == "Constant" and n.name.startswith("layers.1/")
    }
    # tiny-moe: 16 experts, top-4, norm_topk_prob; `@top_k` / `@normalize` resolved to the call's values
    assert constants["k_scalar"] == ("value_int", 4)
    assert constants["normalize_int"] == ("value_int", 1)
