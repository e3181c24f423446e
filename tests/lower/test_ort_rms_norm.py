"""RMSNorm -> ORT SimplifiedLayerNormalization: the lowered graph against the canonical one and the PyTorch
reference on fresh random inputs (ORT CPU), the op counts, and the reasons a norm is declined."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.backends.base import empty_kv_cache, graph_feeds
from qwen3_compile.backends.torch_reference import TorchRunner
from qwen3_compile.lower import lower
from qwen3_compile.lower.ort_rms_norm import RmsNormToSimplifiedLayerNorm
from qwen3_compile.lower.rules import apply_rules

from .moe_graphs import settled_positions

RULE = RmsNormToSimplifiedLayerNorm.name


def ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def random_prompt(vocab: int, batch: int = 2, length: int = 9) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng()
    ids = rng.integers(0, vocab, (batch, length), dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape).copy()
    return ids, mask, positions


def ort_logits(model: onnx.ModelProto, config, ids, mask, positions, dtype) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    cache = empty_kv_cache(ids.shape[0], layers, heads, config.head_dim, dtype)
    return session.run(["logits"], graph_feeds(ids, mask, positions, cache))[0].astype(np.float32)


def norms_only(model: onnx.ModelProto) -> onnx.ModelProto:
    lowered = copy.deepcopy(model)
    report = apply_rules(lowered, [RmsNormToSimplifiedLayerNorm()])
    assert report.declined == {}
    return lowered


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_fp32_lowered_matches_canonical(artifacts, preset):
    canonical = onnx.load(artifacts.export(preset, "fp32") / "model.onnx")
    config = artifacts.loaded(preset).model.config
    lowered = norms_only(canonical)
    for _ in range(2):
        prompt = random_prompt(config.vocab_size)
        want = ort_logits(canonical, config, *prompt, np.float32)
        got = ort_logits(lowered, config, *prompt, np.float32)
        # fp32 summation order: measured up to 2.5e-5 on logits up to 60, as large as the canonical graph's
        # own distance from PyTorch; an absolute 1e-5 does not hold
        assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_fp16_lowered_no_worse_than_canonical(artifacts, preset):
    """fp16 rounds differently (ORT scales before the cast back): both against the fp32 PyTorch reference, at
    the positions whose logits do not hang on a near-tied expert choice (`settled_positions`: fp16 rounding
    may route those to another expert in either graph)."""
    canonical = onnx.load(artifacts.export(preset, "fp16") / "model.onnx")
    loaded = artifacts.loaded(preset)
    config = loaded.model.config
    lowered = norms_only(canonical)
    reference = TorchRunner(loaded)
    for _ in range(2):
        for _ in range(20):  # fresh draws until half the positions are settled
            prompt = random_prompt(config.vocab_size)
            settled = settled_positions(loaded.model, prompt[0])
            if settled.sum() >= settled.size // 2:
                break
        assert settled.sum() >= settled.size // 2, settled
        want, _ = reference.forward(*prompt, reference.empty_cache(prompt[0].shape[0]))
        base = np.abs(ort_logits(canonical, config, *prompt, np.float16) - want).max(-1)[settled].max()
        err = np.abs(ort_logits(lowered, config, *prompt, np.float16) - want).max(-1)[settled].max()
        assert err <= 2 * base + 1e-4, (err, base)


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_norm_lowered(artifacts, preset, dtype):
    model = onnx.load(artifacts.export(preset, dtype) / "model.onnx")
    layers = artifacts.loaded(preset).model.config.num_hidden_layers
    report = lower(model, "ort")
    assert report.applied[RULE] == 4 * layers + 1
    assert RULE not in report.declined
    assert ops(model, "ReduceMean") == ops(model, "Reciprocal") == 0
    assert ops(model, "SimplifiedLayerNormalization") == 4 * layers + 1
    norm = next(n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization")
    attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
    assert norm.domain == "" and attrs["axis"] == -1 and attrs["stash_type"] == 1
    assert attrs["epsilon"] == pytest.approx(artifacts.loaded(preset).model.config.rms_norm_eps)
    onnx.checker.check_model(model)  # the schema the rule registers with onnx


def test_intermediate_read_elsewhere_is_declined(artifacts):
    """A norm whose variance is also a graph output stays as it is, and the report says why."""
    model = onnx.load(artifacts.export("tiny-dense", "fp32") / "model.onnx")
    mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    model.graph.output.append(helper.make_tensor_value_info(mean.output[0], TensorProto.FLOAT, None))
    layers = artifacts.loaded("tiny-dense").model.config.num_hidden_layers
    report = lower(model, "ort")
    assert report.applied[RULE] == 4 * layers
    assert report.declined[RULE] == [f"{mean.name}: '{mean.output[0]}' is read outside the norm"]
    assert ops(model, "ReduceMean") == 1


def norm_graph(axes=(-1,), eps_constant=True, weight_initializer=True) -> onnx.ModelProto:
    """One fp16 RMSNorm written as the exporter writes it, with one thing changed."""
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x32", "x32"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["x32", "inv"], ["n32"]),
        helper.make_node("Cast", ["n32"], ["n"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["w", "n"], ["y"], name="scale"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])]
    inits = [numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes")]
    for name, value in (("eps", np.array(1e-6, np.float32)), ("w", np.ones(8, np.float16))):
        if (name == "eps" and eps_constant) or (name == "w" and weight_initializer):
            inits.append(numpy_helper.from_array(value, name))
        else:
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            inputs.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
    graph = helper.make_graph(
        nodes, "norm", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 8])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(
    "change, reason",
    [
        ({}, None),
        ({"axes": (1,)}, "axes are [1], not [-1]"),
        ({"eps_constant": False}, "eps is not a constant"),
        ({"weight_initializer": False}, "no initializer weight"),
    ],
)
def test_decline_reasons(change, reason):
    model = norm_graph(**change)
    x = np.random.default_rng().standard_normal((2, 8)).astype(np.float16)
    report = lower(model, "ort")
    if reason is None:
        assert report.applied == {RULE: 1} and [n.op_type for n in model.graph.node] == [
            "SimplifiedLayerNormalization"
        ]
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x32 = x.astype(np.float32)
        want = x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(session.run(None, {"x": x})[0].astype(np.float32), want, atol=2e-3)
        return
    assert report.applied == {}
    (why,) = report.declined[RULE]
    assert reason in why


def test_custom_op_lowering_keeps_expert_dispatch_and_fuses_the_norms(artifacts, tmp_path):
    """`lower --for ort --moe-lowering custom-op`: the norms become SimplifiedLayerNormalization while every
    ExpertDispatch stays for the custom-op library to claim; the graph computes what the canonical one does
    (ORT CPU runs the ExpertDispatch function body)."""
    from click.testing import CliRunner

    from qwen3_compile.cli import main

    export = artifacts.export("tiny-moe")
    out = tmp_path / "custom-op"
    result = CliRunner().invoke(
        main, ["lower", str(export), "--for", "ort", "--moe-lowering", "custom-op", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    lowered, canonical = onnx.load(str(out / "model.onnx")), onnx.load(str(export / "model.onnx"))
    layers = 2
    assert ops(lowered, "ExpertDispatch") == ops(canonical, "ExpertDispatch") == layers
    assert ops(lowered, "SimplifiedLayerNormalization") == 4 * layers + 1 and ops(lowered, "ReduceMean") == 0
    config = artifacts.loaded("tiny-moe").model.config
    ids, mask, positions = random_prompt(config.vocab_size)
    want = ort_logits(canonical, config, ids, mask, positions, np.float32)
    got = ort_logits(lowered, config, ids, mask, positions, np.float32)
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())
    refused = CliRunner().invoke(
        main,
        [
            "lower",
            str(export),
            "--for",
            "tensorrt",
            "--target",
            "rtx-ada",
            "--moe-lowering",
            "custom-op",
            "-o",
            str(tmp_path / "x"),
        ],
    )
    assert refused.exit_code == 2 and "--moe-lowering" in refused.output
