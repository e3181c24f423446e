"""`weights.lm_head`: the output projection quantized by the weight-only recipes. The recipe field through
the strict decoder; the quantized lm_head against an independent numpy quantizer (tied tiny-dense: a copy of
the embedding table, the gather kept float; untied tiny-moe: lm_head itself); the whole graph against
transformers with the same weights fake-quantized in numpy; the INT4 head lowered to MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from qwen3_compile.backends.base import left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.errors import BadInputError
from qwen3_compile.models.loading import load_model
from qwen3_compile.quantize.recipe import QuantRecipe, load_recipe, with_group_size, with_lm_head
from qwen3_compile.quantize.stage import quantize_artifact
from qwen3_compile.storage.external_data import unpack_int4

GROUP = 32
# preset -> (recipe, lm_head format): tiny-dense ties its embeddings, tiny-moe does not
CASES = {"tiny-dense": ("int4-rtn", "int4"), "tiny-moe": ("int8-wo", "int8")}


def reference_quantize(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """This test's own symmetric quantizer for a [out, in] weight, in fp32 as the recipes define it: INT8
    per output row (absmax / 127), INT4 per group of GROUP input channels (absmax / 7); round half to even.
    Returns (q, scale broadcast to w's shape)."""
    w = w.astype(np.float32)
    qmax = np.float32(127 if dtype == "int8" else 7)
    g = w.reshape(w.shape[0], -1, w.shape[1] if dtype == "int8" else GROUP)
    scale = np.abs(g).max(axis=-1, keepdims=True) / qmax
    q = np.clip(np.round(g / scale), -qmax, qmax)
    return q.reshape(w.shape), np.broadcast_to(scale, g.shape).reshape(w.shape)


def test_recipe_field_decodes_strictly():
    assert load_recipe("int4-rtn").weights.lm_head == "float"  # the default: nothing changes
    data = load_recipe("int4-rtn").to_dict()
    data["weights"]["lm_head"] = "int4"
    recipe = QuantRecipe.from_dict(data, "r.toml")
    assert recipe.weights.lm_head == "int4" and QuantRecipe.from_dict(recipe.to_dict()) == recipe
    assert with_lm_head(load_recipe("int8-wo"), "int8").name == "int8-wo+lm-head-int8"
    refusals = [("int8-wo", "int4", "per group"), ("int8-sq", "int8", "activations"), ("fp8", "int8", "fp8")]
    for name, head, says in refusals:
        with pytest.raises(BadInputError) as info:
            with_lm_head(load_recipe(name), head)
        assert info.value.field == "weights.lm_head" and says in info.value.problem
    data["weights"]["lm_head"] = "int2"
    with pytest.raises(BadInputError) as info:
        QuantRecipe.from_dict(data, "r.toml")
    assert info.value.field == "weights.lm_head"


@pytest.fixture(scope="module")
def quantized(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-head")
    made = {}
    for preset, (name, head) in CASES.items():
        recipe = load_recipe(name)
        recipe = with_group_size(recipe, GROUP) if recipe.weights.dtype == "int4" else recipe
        made[preset] = quantize_artifact(artifacts.export(preset), with_lm_head(recipe, head), out / preset)
    return made


@pytest.mark.parametrize("preset", CASES)
def test_lm_head_equals_numpy_reference(preset, quantized, artifacts):
    _, head = CASES[preset]
    model = onnx.load(str(quantized[preset].directory / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    values, scale = inits["lm_head.weight.T.q"], inits["lm_head.weight.T.scale"]
    torch_model = artifacts.loaded(preset).model
    w = torch_model.lm_head.weight.detach().numpy()  # [vocab, hidden]; tied: the embedding table
    want_q, want_scale = reference_quantize(w, head)
    if head == "int4":
        assert values.data_type == TensorProto.INT4
        got_q = unpack_int4(np.frombuffer(values.raw_data, np.uint8), tuple(values.dims)).T
        got_scale = np.repeat(numpy_helper.to_array(scale).T, GROUP, axis=1)
    else:
        got_q = numpy_helper.to_array(values).T
        got_scale = np.repeat(numpy_helper.to_array(scale)[:, None], w.shape[1], axis=1)
    np.testing.assert_array_equal(got_q, want_q)
    np.testing.assert_allclose(got_scale, want_scale, rtol=1e-6)
    # the gather still reads the float table, unchanged
    embeddings = numpy_helper.to_array(inits["model.embed_tokens.weight"])
    np.testing.assert_array_equal(embeddings, torch_model.model.embed_tokens.weight.detach().numpy())
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert gather.input[0] == "model.embed_tokens.weight"
    assert not any(
        n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight" for n in model.graph.node
    )
    names = [t.name for t in quantized[preset].tensors]
    assert "lm_head.weight" in names and names.count("lm_head.weight") == 1


@torch.no_grad()
def _fake_quantized(preset: str) -> torch.nn.Module:
    """transformers' model, every recipe-selected weight and lm_head replaced by this test's dequantized
    ones; a tied lm_head untied (the embedding stays float)."""
    name, head = CASES[preset]
    model = load_model(preset).model
    select = load_recipe(name).select
    for param_name, param in model.named_parameters():
        if select.selects(param_name) and param.ndim >= 2:
            w = param.numpy()
            flat = w.reshape(-1, w.shape[-1])
            q, scale = reference_quantize(flat, "int4" if name.startswith("int4") else "int8")
            param.copy_(torch.from_numpy((q * scale).reshape(w.shape).astype(np.float32)))
    q, scale = reference_quantize(model.lm_head.weight.numpy(), head)
    model.lm_head.weight = torch.nn.Parameter(torch.from_numpy((q * scale).astype(np.float32)))
    return model


@pytest.mark.parametrize("preset", CASES)
def test_graph_equals_torch_fake_quant(preset, quantized, artifacts):
    ids = np.random.default_rng().integers(0, 151643, (6, 7))
    with torch.no_grad():
        want = _fake_quantized(preset)(torch.from_numpy(ids)).logits.numpy()
        fp32 = artifacts.loaded(preset).model(torch.from_numpy(ids)).logits.numpy()
    artifact = quantized[preset]
    runner = OrtRunner(artifact.directory / "model.onnx", session_config=artifact.manifest.ort_session_config)
    batch = left_padded_batch(ids.tolist(), 0)
    got = runner.forward(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(6))[0]
    matching = np.abs(got - want).max(axis=(1, 2)) <= 2e-3  # one sequence may drift at a near-tied expert
    assert matching.sum() >= 5, np.abs(got - want).max(axis=(1, 2))
    assert np.abs(want - fp32).max() > 0.01


def test_int4_lm_head_lowers_to_matmul_nbits(quantized, tmp_path):
    from qwen3_compile.lower.stage import lower_artifact

    artifact = quantized["tiny-dense"]
    lowered = lower_artifact(artifact.directory, tmp_path / "ort", "ort")
    assert lowered.op_histogram["com.microsoft::MatMulNBits"] == len(artifact.tensors)  # 14 + lm_head
    model = onnx.load(str(lowered.model_path), load_external_data=False)
    heads = [
        n
        for n in model.graph.node
        if n.op_type == "MatMulNBits" and {(a.name, a.i) for a in n.attribute} >= {("N", 151936), ("K", 64)}
    ]
    assert len(heads) == 1 and heads[0].output[0] in {i for n in model.graph.node for i in n.input} | {
        "logits"
    }
