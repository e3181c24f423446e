"""ExpertDispatch -> the qmoe plugin node (fp16 experts, INT8 per-row and INT4 per-group weight-only
experts). ONNX Runtime cannot run the plugin, so the lowered graph runs in ONNX's reference evaluator with
the node computed by the kernels' float64 reference (`qwen3_compile.kernels.moe.moe_reference`, itself
tested against torch and the CUDA kernels), against ONNX Runtime on the canonical node."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, function
from qwen3_compile.kernels import trt_contract as contract
from qwen3_compile.kernels.moe import moe_reference
from qwen3_compile.lower import lower

from .moe_graphs import expert_dispatch_node

OPSET = 21


class Qwen3MoE(OpRun):
    op_domain = contract.NODE_DOMAIN

    def _run(self, hidden, logits, gate_up, down, gate_up_scale=None, down_scale=None, **attrs):
        assert attrs["plugin_namespace"] == contract.PLUGIN_NAMESPACE and attrs["activation"] == "silu"
        if gate_up.dtype == ml_dtypes.int4:  # per-group scales [E, rows, cols / G]: dequantized here
            gate_up, down = (
                q.astype(np.float64) * np.repeat(s.astype(np.float64), q.shape[-1] // s.shape[-1], axis=-1)
                for q, s in ((gate_up, gate_up_scale), (down, down_scale))
            )
            gate_up_scale = down_scale = None
        scales = [
            None if s is None else torch.from_numpy(s.astype(np.float64)) for s in (gate_up_scale, down_scale)
        ]

        def weights(w):  # int8 stays int8 (the reference dequantizes with the scales), floats go float64
            return torch.from_numpy(np.array(w, dtype=np.int8 if w.dtype == np.int8 else np.float64))

        out = moe_reference(
            torch.from_numpy(hidden.astype(np.float32)),
            torch.from_numpy(logits.astype(np.float32)),
            weights(gate_up),
            weights(down),
            attrs["top_k"],
            bool(attrs["normalize"]),
            *scales,
        )
        return (out.numpy().astype(hidden.dtype),)


def _model(rng, dtype, quant=None, tokens=9, hidden=128, experts=8, inter=64, top_k=2, group=32):
    """ExpertDispatch over fp16 initializers, or (quant "int8" / "int4") over the canonical DequantizeLinear
    nodes: int8 per output row, int4 per group of `group` input channels."""
    np_dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[dtype]
    gate_up = rng.normal(0, 0.1, (experts, 2 * inter, hidden))
    down = rng.normal(0, 0.1, (experts, hidden, inter))
    nodes, inits = [], []
    names = []
    for name, w in (("gate_up", gate_up), ("down", down)):
        if quant:
            block, levels = (w.shape[2], 127) if quant == "int8" else (group, 7)
            g = w.reshape(*w.shape[:2], -1, block)
            scale = (np.abs(g).max(axis=3) / levels).astype(np_dtype)  # [E, rows, cols / block]
            q = np.clip(np.round(g / scale[..., None]), -levels, levels).reshape(w.shape).astype(np.int8)
            values = q if quant == "int8" else q.astype(ml_dtypes.int4)
            inits += [
                numpy_helper.from_array(values, f"{name}_q"),
                numpy_helper.from_array(scale, f"{name}_s"),
            ]
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{name}_q", f"{name}_s"], [name], axis=2, block_size=block
                )
            )
        else:
            inits.append(numpy_helper.from_array(w.astype(np_dtype), name))
        names.append(name)
    nodes.append(expert_dispatch_node(["hidden", "logits", *names], "out", top_k, name="layers.0/experts"))
    graph = helper.make_graph(
        nodes,
        "dispatch",
        [
            helper.make_tensor_value_info("hidden", dtype, ["n", hidden]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", experts]),
        ],
        [helper.make_tensor_value_info("out", dtype, ["n", hidden])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=[function(EXPERT_DISPATCH, OPSET)],
    )
    feeds = {
        "hidden": rng.normal(0, 1, (tokens, hidden)).astype(np_dtype),
        "logits": rng.normal(0, 2, (tokens, experts)).astype(np.float32),
    }
    return model, feeds


@pytest.mark.parametrize("quant", [None, "int8", "int4"], ids=["fp16", "int8-weights", "int4-weights"])
def test_plugin_node_matches_canonical(quant):
    rng = np.random.default_rng()
    model, feeds = _model(rng, TensorProto.FLOAT16, quant)
    quantized = {t.name: t.SerializeToString() for t in model.graph.initializer if t.name.endswith("_q")}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0].astype(np.float32)

    report = lower(model, "trt-plugin")
    assert report.applied == {"expert_dispatch_to_qwen3_moe_plugin": 1}
    (node,) = [n for n in model.graph.node if n.domain == contract.NODE_DOMAIN]
    assert node.op_type == contract.PLUGIN_NAME and len(node.input) == (6 if quant else 4)
    inits = {t.name: t for t in model.graph.initializer}
    if quant:  # the model's own quantized initializers; int4 scales as they are, int8 ones as [E, rows]
        assert list(node.input[2:4]) == ["gate_up_q", "down_q"]
        assert {name: inits[name].SerializeToString() for name in node.input[2:4]} == quantized
        scales = ["gate_up_s", "down_s"] if quant == "int4" else ["gate_up_s.rows", "down_s.rows"]
        assert list(node.input[4:]) == scales
        assert [list(inits[s].dims) for s in scales] == (
            [[8, 128, 4], [8, 128, 2]] if quant == "int4" else [[8, 128], [8, 128]]
        )
    got = ReferenceEvaluator(model, new_ops=[Qwen3MoE]).run(None, feeds)[0].astype(np.float32)
    # fp16 graph against a float64 reference: a few fp16 ulps of the output's scale
    np.testing.assert_allclose(got, expected, atol=4e-3 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize(
    "dtype, shape, reason",
    [
        (TensorProto.FLOAT, {}, "fp16/bf16"),
        (TensorProto.FLOAT16, {"hidden": 64, "inter": 32}, "not a multiple of 128"),
    ],
)
def test_declines_what_the_kernels_do_not_run(dtype, shape, reason):
    model, _ = _model(np.random.default_rng(0), dtype, None, **shape)
    report = lower(model, "trt-plugin")  # the dense rule takes the node instead
    assert report.applied == {"expert_dispatch_to_dense_experts": 1}
    assert not report.declined  # the dense rule took it: nothing is left unlowered
    (why,) = report.declined_nodes["expert_dispatch_to_qwen3_moe_plugin"].values()
    assert reason in why


@pytest.mark.parametrize(
    "quant, case, reason",
    [
        ("int4", {"group": 16}, "INT4 group size 16"),
        ("int8", {"hidden": 64, "inter": 32}, "not a multiple of 128"),
        ("int4", {"dtype": TensorProto.FLOAT}, "dequantize to fp32"),
    ],
)
def test_declines_quantized_experts_the_kernels_do_not_take(quant, case, reason):
    dtype = case.pop("dtype", TensorProto.FLOAT16)
    model, _ = _model(np.random.default_rng(0), dtype, quant, **case)
    report = lower(model, "trt-plugin")
    assert report.applied == {"expert_dispatch_to_dense_experts": 1}
    (why,) = report.declined_nodes["expert_dispatch_to_qwen3_moe_plugin"].values()
    assert reason in why, why
