"""ExpertDispatch -> the qmoe plugin node. ONNX Runtime cannot run the plugin, so the lowered graph runs in
ONNX's reference evaluator with the node computed by the kernels' float64 reference
(`qwen3_compile.kernels.moe.moe_reference`, itself tested against torch and the CUDA kernels), against ONNX
Runtime on the canonical node."""

from __future__ import annotations

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

OPSET = 21


class Qwen3MoE(OpRun):
    op_domain = contract.NODE_DOMAIN

    def _run(self, hidden, logits, gate_up, down, gate_up_scale=None, down_scale=None, **attrs):
        assert attrs["plugin_namespace"] == contract.PLUGIN_NAMESPACE and attrs["activation"] == "silu"
        scales = [
            None if s is None else torch.from_numpy(s.astype(np.float64)) for s in (gate_up_scale, down_scale)
        ]

        def weights(w):  # int8 stays int8 (the reference dequantizes with the scales), floats go fp32
            return torch.from_numpy(np.array(w, dtype=np.int8 if w.dtype == np.int8 else np.float32))

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


def _model(rng, dtype, int8, tokens=9, hidden=128, experts=8, inter=64, top_k=2):
    np_dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[dtype]
    gate_up = rng.normal(0, 0.1, (experts, 2 * inter, hidden))
    down = rng.normal(0, 0.1, (experts, hidden, inter))
    nodes, inits = [], []
    names = []
    for name, w in (("gate_up", gate_up), ("down", down)):
        if int8:
            scale = (np.abs(w).max(axis=2, keepdims=True) / 127).astype(np_dtype)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s")]
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{name}_q", f"{name}_s"], [name], axis=2, block_size=w.shape[2]
                )
            )
        else:
            inits.append(numpy_helper.from_array(w.astype(np_dtype), name))
        names.append(name)
    nodes.append(
        helper.make_node(
            EXPERT_DISPATCH,
            ["hidden", "logits", *names],
            ["out"],
            name="layers.0/experts",
            domain=DOMAIN,
            top_k=top_k,
            normalize=1,
            activation="silu",
        )
    )
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


@pytest.mark.parametrize("int8", [False, True], ids=["fp16", "int8-weights"])
def test_plugin_node_matches_canonical(int8):
    rng = np.random.default_rng()
    model, feeds = _model(rng, TensorProto.FLOAT16, int8)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0].astype(np.float32)

    report = lower(model, "trt-plugin")
    assert report.applied == {"expert_dispatch_to_qwen3_moe_plugin": 1}
    (node,) = [n for n in model.graph.node if n.domain == contract.NODE_DOMAIN]
    assert node.op_type == contract.PLUGIN_NAME and len(node.input) == (6 if int8 else 4)
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
    model, _ = _model(np.random.default_rng(0), dtype, False, **shape)
    report = lower(model, "trt-plugin")  # the dense rule takes the node instead
    assert report.applied == {"expert_dispatch_to_dense_experts": 1}
    assert not report.declined  # the dense rule took it: nothing is left unlowered
    (why,) = report.declined_nodes["expert_dispatch_to_qwen3_moe_plugin"].values()
    assert reason in why
