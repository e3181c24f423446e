"""Deployment graphs with last-position logits: ONNX Runtime before and after (the last row and the KV cache
must be what the full graph computes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qwen3_compile.backends.base import left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.export.stage import ExportOptions, export_onnx
from qwen3_compile.lower import lower


@pytest.mark.parametrize("preset, dtype", [("tiny-dense", "fp32"), ("tiny-moe", "fp16")])
def test_last_position_logits(tmp_path, preset, dtype):
    exported = export_onnx(preset, tmp_path / "export", ExportOptions(dtype=dtype))
    model = onnx.load(str(exported.model_path))
    report = lower(model, "last-logits")
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


@pytest.mark.parametrize("attention", ["standard", "gqa"])
def test_lower_for_ort_with_last_logits_generates_the_canonical_reply(attention, artifacts, tmp_path):
    """`lower --for ort --logits last` (with either attention): `run`'s loop gives the canonical export's
    greedy tokens (GQA on a static cache too); validate refuses the graph; a right-padded prompt batch,
    whose last position is padding, is refused."""
    from click.testing import CliRunner

    from qwen3_compile.cli import main
    from qwen3_compile.errors import BadInputError
    from qwen3_compile.generation.loop import generate_reply
    from qwen3_compile.storage.manifest import read_manifest

    source = artifacts.export("tiny-moe")
    out = tmp_path / "last"
    args = ["lower", str(source), "--for", "ort", "--attention", attention, "--logits", "last"]
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert '"logits": "last"' in result.output and read_manifest(out).options.logits == "last"

    prompt = np.random.default_rng().integers(0, 151643, size=37).tolist()
    greedy = lambda x: int(x.argmax())  # noqa: E731
    expected = generate_reply(OrtRunner(source / "model.onnx"), prompt, 12, greedy, stop_ids=())
    runners = [OrtRunner(out / "model.onnx")]
    if attention == "gqa":
        runners.append(OrtRunner(out / "model.onnx", static_cache_length=64))
    for runner in runners:
        assert runner.last_logits
        got = generate_reply(runner, prompt, 12, greedy, stop_ids=())
        assert got.generated_ids == expected.generated_ids

    result = CliRunner().invoke(main, ["validate", str(out), "--reference", "tiny-moe"])
    assert result.exit_code == 2 and "options.logits" in result.output, result.output
    ids = np.array([prompt[:5], prompt[:5]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    with pytest.raises(BadInputError, match="right padding"):
        runners[0].forward(ids, mask, np.arange(5)[None].repeat(2, 0), runners[0].empty_cache(2))
