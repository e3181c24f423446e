"""The runner's ONNX Runtime path on graphs lowered with the TensorRT plugin node: `trt.plugins::Qwen3MoE`
(which ORT cannot run) is mapped back to the reference ExpertDispatch function shipped in the bundle, on the
same weights. Checked on one MoE layer of kernel-supported shapes (hidden 128, 8 experts x 64, top-2),
fp16, INT8 and INT4 (groups of 32) weight-only: the plugin graph mapped back equals the canonical graph,
and both equal a float64 numpy MoE."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.custom_ops import function
from qwen3_compile.lower import lower

from .device_files import DEVICE, load_device_module

GRAPHS = Path(__file__).parents[2] / "graphs"
N, H, E, INTER, K = 5, 128, 8, 64, 2


def load_runner():
    return load_device_module(DEVICE / "runner.py", "bundle_runner")


def moe_layer(quant: str | None, rng: np.random.Generator):
    """A canonical graph of one ExpertDispatch (fp16 activations), its weights and a numpy reference."""
    gate_up = rng.normal(0, 0.05, (E, 2 * INTER, H))
    down = rng.normal(0, 0.05, (E, H, INTER))
    inits, nodes, names = [], [], []
    for name, w in (("gate_up", gate_up), ("down", down)):
        if quant:  # symmetric INT8 per row or INT4 per group of 32, dequantized along axis 2 (blocked)
            block, levels = (w.shape[2], 127) if quant == "int8" else (32, 7)
            g = w.reshape(E, -1, w.shape[2] // block, block)
            scale = (np.abs(g).max(axis=3) / levels).astype(np.float16)  # [E, rows, cols / block]
            q = np.clip(np.round(g / scale[..., None].astype(np.float64)), -levels, levels)
            w = (q * scale[..., None].astype(np.float64)).reshape(w.shape)
            q = q.reshape(w.shape).astype(np.int8)
            values = q if quant == "int8" else q.astype(ml_dtypes.int4)
            inits += [
                numpy_helper.from_array(values, f"{name}.q"),
                numpy_helper.from_array(scale, f"{name}.s"),
            ]
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{name}.q", f"{name}.s"], [name], axis=2, block_size=block
                )
            )
        else:
            w = w.astype(np.float16).astype(np.float64)
            inits.append(numpy_helper.from_array(w.astype(np.float16), name))
        names.append(w)
    nodes.append(
        helper.make_node(
            "ExpertDispatch", ["hidden", "router", "gate_up", "down"], ["out"], name="layers.0/moe",
            domain="qwen3_compile", top_k=K, normalize=1, activation="silu",
        )
    )  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "moe",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT16, [N, H]),
            helper.make_tensor_value_info("router", TensorProto.FLOAT, [N, E]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [N, H])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("qwen3_compile", 1)],
        functions=[function("ExpertDispatch", 21)],
    )
    return model, names


def numpy_moe(x, logits, gate_up, down):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        top = np.argsort(-probs[n], kind="stable")[:K]
        weights = probs[n, top] / probs[n, top].sum()
        for e, w in zip(top, weights, strict=True):
            g, u = np.split(gate_up[e] @ x[n], 2)
            out[n] += w * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return out


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("quant", [None, "int8", "int4"], ids=["fp16", "int8-wo", "int4-g32"])
def test_plugin_node_mapped_back_equals_the_canonical_graph(quant):
    rng = np.random.default_rng(0)
    canonical, (gate_up, down) = moe_layer(quant, rng)
    x = rng.normal(0, 1, (N, H)).astype(np.float16)
    logits = rng.normal(0, 1, (N, E)).astype(np.float32)
    feeds = {"hidden": x, "router": logits}
    expected = run(canonical, feeds)

    lowered = onnx.ModelProto()
    lowered.CopyFrom(canonical)
    report = lower(lowered, "trt-plugin")
    assert report.to_dict()["applied"] == {"expert_dispatch_to_qwen3_moe_plugin": 1}
    plugin = [n for n in lowered.graph.node if n.op_type == "Qwen3MoE"]
    assert len(plugin) == 1 and len(plugin[0].input) == (6 if quant else 4)
    with pytest.raises(Exception, match="Qwen3MoE"):  # what ORT says about the plugin node itself
        run(lowered, feeds)

    runner = load_runner()
    assert runner.map_plugin_nodes(lowered, GRAPHS) == 1
    assert not any(n.op_type == "Qwen3MoE" for n in lowered.graph.node)
    got = run(lowered, feeds)
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0, atol=2e-3)
    reference = numpy_moe(x.astype(np.float64), logits.astype(np.float64), gate_up, down)
    np.testing.assert_allclose(got.astype(np.float64), reference, rtol=0, atol=5e-3)
    assert np.abs(reference).max() > 0.05  # a layer whose output is not ~0
