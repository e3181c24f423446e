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
    from qwen3_compile.generation.sampling import Sampler, SamplingConfig
    from qwen3_compile.storage.manifest import read_manifest

    source = artifacts.export("tiny-moe")
    out = tmp_path / "last"
    args = ["lower", str(source), "--for", "ort", "--attention", attention, "--logits", "last"]
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert '"logits": "last"' in result.output and read_manifest(out).options.logits == "last"

    prompt = np.random.default_rng().integers(0, 151643, size=37).tolist()
    on_host = lambda x: int(x.argmax())  # noqa: E731  (numpy's argmax on the host logits)
    expected = generate_reply(OrtRunner(source / "model.onnx"), prompt, 12, on_host, stop_ids=())
    runners = [OrtRunner(out / "model.onnx"), OrtRunner(out / "model.onnx", io_binding=True)]
    if attention == "gqa":
        runners.append(OrtRunner(out / "model.onnx", static_cache_length=64))
    greedy = Sampler(SamplingConfig(greedy=True))
    for runner in runners:
        assert runner.last_logits and runner.greedy
        on_host_reply = generate_reply(runner, prompt, 12, on_host, stop_ids=())
        assert on_host_reply.generated_ids == expected.generated_ids
        # a greedy sampler lets the graph pick the token: the logits never reach the host
        calls = []
        runner.forward = lambda *args, _calls=calls: _calls.append(args)
        got = generate_reply(runner, prompt, 12, greedy, stop_ids=())
        assert got.generated_ids == expected.generated_ids and not calls
        del runner.forward

    result = CliRunner().invoke(main, ["validate", str(out), "--reference", "tiny-moe"])
    assert result.exit_code == 2 and "options.logits" in result.output, result.output
    ids = np.array([prompt[:5], prompt[:5]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    with pytest.raises(BadInputError, match="right padding"):
        runners[0].forward(ids, mask, np.arange(5)[None].repeat(2, 0), runners[0].empty_cache(2))


def test_greedy_token_outputs_match_numpy():
    """The greedy-token rule on a graph whose logits are its input: ArgMax with the lowest index on ties and
    the NaN flag, against numpy on fresh random rows (ties and a NaN row planted)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qwen3_compile.lower import make_rules
    from qwen3_compile.lower.rules import apply_rules

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 1, 50])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, 50])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "g", [x], [logits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    report = apply_rules(model, make_rules("ort-last-logits"))
    assert report.applied == {"greedy_token": 1}  # the logits are already last-position only
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng()
    rows = rng.standard_normal((4, 1, 50)).astype(np.float32)
    rows[1, 0, [7, 31]] = rows[1].max() + 1.0  # a tie: the lower index wins
    rows[2, 0, rng.integers(50)] = np.nan
    token, nan = session.run(["next_token", "logits_nan"], {"x": rows})
    assert token.shape == (4, 1) and nan.shape == (4, 1)
    assert nan[:, 0].tolist() == [False, False, True, False]
    real = [0, 1, 3]
    assert token[real, 0].tolist() == rows[real, 0].argmax(-1).tolist()
    assert token[1, 0] == 7


def test_a_nan_row_stops_generation_with_the_graph_picking_the_token():
    from qwen3_compile.errors import CheckFailedError
    from qwen3_compile.generation.loop import generate_reply
    from qwen3_compile.generation.sampling import Sampler, SamplingConfig

    class Broken:
        name, greedy = "broken", True

        def empty_cache(self, batch):
            return []

        def forward_greedy(self, ids, mask, positions, cache):
            return np.array([5]), np.array([True]), cache

    with pytest.raises(CheckFailedError, match="NaN logits"):
        generate_reply(Broken(), [1, 2, 3], 4, Sampler(SamplingConfig(greedy=True)), stop_ids=())
