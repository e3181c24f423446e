"""`lower --for ort --moe-lowering custom-op`: DequantizeLinear -> ExpertDispatch over INT8 / INT4 weight-only
experts becomes one `qwen3_compile::WeightOnlyExpertDispatch` over the quantized initializers and their scales
(lower/ort_custom_op_moe.py). Without the custom-op library ORT runs the node's function body: on ORT CPU
it must compute what the canonical graph computes (fresh random inputs), the graph must pass onnx's checker,
and what the kernels cannot take must be declined with the reason. The library's CUDA kernels on the lowered
graph: tests/backends/test_ort_custom_op.py (gpu)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.backends.onnxruntime.settings import ORT_QDQ, session_options
from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, WEIGHT_ONLY_EXPERT_DISPATCH, function
from qwen3_compile.lower import lower

from .moe_graphs import expert_dispatch_node

RULE = "quantized_experts_to_weight_only_dispatch"
NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def quantize(w: np.ndarray, kind: str, group: int, scale_type: int) -> tuple[onnx.TensorProto, ...]:
    """(q, scale) initializers as the quantizer writes them: int8 per row (scale [E, rows, 1]) or int4 per
    group along the input axis (scale [E, rows, cols / group]), symmetric."""
    block = w.shape[-1] if kind == "int8" else group
    levels = 127 if kind == "int8" else 7
    g = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
    scale = (np.abs(g).max(axis=-1) / levels).astype(NP_TYPES.get(scale_type, np.float32))
    q = np.clip(np.round(g / scale[..., None].astype(np.float64)), -levels, levels).reshape(w.shape)
    values = q.astype(np.int8) if kind == "int8" else q.astype(np.int8).astype(ml_dtypes.int4)
    if scale_type == TensorProto.BFLOAT16:  # numpy has no bf16: the top half of fp32
        bits = (scale.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        scale_init = helper.make_tensor("s", TensorProto.BFLOAT16, scale.shape, bits.tobytes(), raw=True)
    else:
        scale_init = numpy_helper.from_array(scale, "s")
    return numpy_helper.from_array(values, "q"), scale_init, block


def dispatch_model(
    rng,
    kind: str = "int8",
    act: int = TensorProto.FLOAT16,
    experts: int = 8,
    hidden: int = 128,
    inter: int = 64,
    top_k: int = 2,
    group: int = 32,
    scale_type: int | None = None,
    groups: tuple[int, int] | None = None,
) -> onnx.ModelProto:
    """The canonical quantized MoE node: DequantizeLinear(q, scale, axis 2, block) -> ExpertDispatch."""
    scale_type = act if scale_type is None else scale_type
    weights = {
        "gate_up": rng.normal(0, 0.1, (experts, 2 * inter, hidden)),
        "down": rng.normal(0, 0.1, (experts, hidden, inter)),
    }
    nodes, inits = [], []
    for i, (name, w) in enumerate(weights.items()):
        q, s, block = quantize(w, kind, groups[i] if groups else group, scale_type)
        q.name, s.name = f"{name}.q", f"{name}.scale"
        inits += [q, s]
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [q.name, s.name], [name], name=f"{name}/DQ", axis=2, block_size=block
            )
        )
    nodes.append(
        expert_dispatch_node(["hidden", "logits", "gate_up", "down"], "out", top_k, name="layers.0/experts")
    )
    graph = helper.make_graph(
        nodes,
        "dispatch",
        [
            helper.make_tensor_value_info("hidden", act, ["n", hidden]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", experts]),
        ],
        [helper.make_tensor_value_info("out", act, ["n", hidden])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(
        graph, opset_imports=opsets, functions=[function(EXPERT_DISPATCH, 21)], ir_version=10
    )


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """ORT CPU as a quantized artifact's manifest says (`reference`: the QDQ graph run as written)."""
    options = session_options("all", ORT_QDQ["reference"])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def feeds(rng, model: onnx.ModelProto, tokens: int) -> dict:
    hidden = model.graph.input[0].type.tensor_type
    width, experts = (
        hidden.shape.dim[1].dim_value,
        model.graph.input[1].type.tensor_type.shape.dim[1].dim_value,
    )
    return {
        "hidden": rng.normal(0, 1, (tokens, width)).astype(NP_TYPES[hidden.elem_type]),
        "logits": rng.normal(0, 2, (tokens, experts)).astype(np.float32),
    }


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_rewrite_takes_the_quantized_initializers_and_keeps_the_semantics(kind):
    rng = np.random.default_rng()
    model = dispatch_model(rng, kind)
    canonical = onnx.ModelProto()
    canonical.CopyFrom(model)
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}

    report = lower(model, "ort-custom-op")
    assert report.applied == {RULE: 1} and not report.declined
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node  # the DequantizeLinear nodes are gone
    assert (node.domain, node.op_type) == (DOMAIN, WEIGHT_ONLY_EXPERT_DISPATCH)
    assert list(node.input) == ["hidden", "logits", "gate_up.q", "down.q", "gate_up.scale", "down.scale"]
    # the very initializers of the canonical graph (no copy, no repacking)
    assert {t.name: t.SerializeToString() for t in model.graph.initializer} == before
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    blocks = (128, 64) if kind == "int8" else (32, 32)
    assert (attrs["gate_up_block_size"], attrs["down_block_size"]) == blocks
    assert (attrs["top_k"], attrs["normalize"], attrs["activation"]) == (2, 1, b"silu")
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, WEIGHT_ONLY_EXPERT_DISPATCH)]

    for tokens in (1, 9):  # the reference body on ORT CPU = the canonical graph, fresh inputs
        inputs = feeds(rng, model, tokens)
        want, got = run(canonical, inputs), run(model, inputs)
        assert np.isfinite(want).all() and np.abs(want).max() > 0
        np.testing.assert_array_equal(got, want)


def test_a_full_artifact_lowers_every_quantized_layer(artifacts, tmp_path):
    """The plugin-sized MoE (hidden 128, 8 experts x 64), int4-rtn at group 32 from the fp16 export: both
    layers rewritten, their inputs the artifact's own INT4 initializers and fp16 scales."""
    from qwen3_compile.lower.stage import lower_artifact

    source = artifacts.plugin_sized_quantized("int4-rtn")
    lowered = lower_artifact(source, tmp_path / "lowered", "ort", moe_lowering="custom-op")
    assert lowered.report.applied[RULE] == 2 and RULE not in lowered.report.declined
    model = onnx.load(str(lowered.model_path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == WEIGHT_ONLY_EXPERT_DISPATCH]
    assert len(nodes) == 2 and not any(n.op_type == EXPERT_DISPATCH for n in model.graph.node)
    for node in nodes:
        types = [inits[name].data_type for name in node.input[2:]]
        assert types == [TensorProto.INT4] * 2 + [TensorProto.FLOAT16] * 2, node.input


@pytest.mark.parametrize(
    "case, reason",
    [
        (dict(act=TensorProto.FLOAT), "dequantize to fp32"),
        (dict(scale_type=TensorProto.BFLOAT16, act=TensorProto.BFLOAT16), "bfloat16 scales"),
        (dict(hidden=64, inter=32), "not a multiple of 128"),  # tiny-moe's widths
        (dict(kind="int4", group=16), "INT4 group size 16"),
        (dict(kind="int4", groups=(32, 64)), "different INT4 group sizes"),
        (dict(kind="int8", top_k=40, experts=64), "top_k must be in 1..32"),
    ],
    ids=["fp32", "bf16-scales", "tiny-widths", "group16", "mixed-groups", "top_k40"],
)
def test_declines_what_the_kernels_do_not_take(case, reason):
    model = dispatch_model(np.random.default_rng(0), **case)
    report = lower(model, "ort-custom-op")
    assert report.applied == {}
    (why,) = report.declined[RULE]
    assert reason in why, why
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "DequantizeLinear", EXPERT_DISPATCH]


def test_declines_a_zero_point():
    model = dispatch_model(np.random.default_rng(0), "int8")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((8, 128, 1), np.int8), "zp"))
    model.graph.node[0].input.append("zp")
    (why,) = lower(model, "ort-custom-op").declined[RULE]
    assert "zero point" in why


def test_float_experts_are_left_for_the_library_and_not_reported():
    """fp16 experts: the library claims ExpertDispatch as it is; the rule neither rewrites nor reports it."""
    rng = np.random.default_rng(0)
    model = dispatch_model(rng)
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    del model.graph.node[:2]
    del model.graph.initializer[:]
    for name in dq:
        w = rng.normal(0, 0.1, (8, 128, 128) if name == "gate_up" else (8, 128, 64)).astype(np.float16)
        model.graph.initializer.append(numpy_helper.from_array(w, name))
    report = lower(model, "ort-custom-op")
    assert report.applied == {} and report.declined == {}
    assert [n.op_type for n in model.graph.node] == [EXPERT_DISPATCH]
