"""Run by test_trt_python_plugin.py in a subprocess (a TensorRT abort must not take pytest down):
parse a one-node ONNX model with the qmoe plugin node and build an engine with TensorRT-RTX, on the CPU.

    python trt_plugin_probe.py {bf16|fp16|int8|int4|int4-group16|fp32-hidden|gelu|no-shim}
        -> one JSON line on stdout
"""

from __future__ import annotations

import json
import sys

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.kernels import trt_contract as C
from qwen3_compile.kernels import trt_python_plugin

E, H, INTER, K = 16, 128, 64, 2
GROUP = 32  # int4: input channels a scale
ONNX_TYPE = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT}


def half_tensor(name, shape, kind, rng):
    vals = (rng.standard_normal(shape) / 16).astype(np.float32)
    if kind == "fp16":
        return numpy_helper.from_array(vals.astype(np.float16), name)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16)  # bf16: the top half of an fp32
    return helper.make_tensor(name, TensorProto.BFLOAT16, shape, vals=bits.tobytes(), raw=True)


def model(case: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    act = {"fp16": "fp16", "fp32-hidden": "fp32"}.get(case, "bf16")
    if case == "int8":
        inits = [
            numpy_helper.from_array(
                rng.integers(-127, 128, (E, 2 * INTER, H), dtype=np.int8), "gate_up_weight"
            ),
            numpy_helper.from_array(rng.integers(-127, 128, (E, H, INTER), dtype=np.int8), "down_weight"),
            numpy_helper.from_array(rng.random((E, 2 * INTER), dtype=np.float32) / 100, "gate_up_scale"),
            numpy_helper.from_array(rng.random((E, H), dtype=np.float32) / 100, "down_scale"),
        ]
    elif case.startswith("int4"):  # the INT4 initializers as the quantizer writes them, per-group fp16 scales
        group = 16 if case == "int4-group16" else GROUP  # 16: a group size the kernels do not take
        inits = [
            numpy_helper.from_array(
                rng.integers(-7, 8, (E, 2 * INTER, H)).astype(ml_dtypes.int4), "gate_up_weight"
            ),
            numpy_helper.from_array(rng.integers(-7, 8, (E, H, INTER)).astype(ml_dtypes.int4), "down_weight"),
            numpy_helper.from_array(
                (rng.random((E, 2 * INTER, H // group)) / 100).astype(np.float16), "gate_up_scale"
            ),
            numpy_helper.from_array(
                (rng.random((E, H, INTER // group)) / 100).astype(np.float16), "down_scale"
            ),
        ]
    else:
        wkind = "fp16" if act == "fp16" else "bf16"
        inits = [
            half_tensor("gate_up_weight", (E, 2 * INTER, H), wkind, rng),
            half_tensor("down_weight", (E, H, INTER), wkind, rng),
        ]
    node = C.make_node(
        ["hidden", "router_logits"] + [t.name for t in inits], "output", C.MoeAttributes(K), "moe0"
    )
    if case == "gelu":  # an activation the kernels do not implement: the creator must refuse it
        for attr in node.attribute:
            if attr.name == "activation":
                attr.s = b"gelu"
    graph = helper.make_graph(
        [node],
        "moe",
        [
            helper.make_tensor_value_info("hidden", ONNX_TYPE[act], ["N", H]),
            helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, ["N", E]),
        ],
        [helper.make_tensor_value_info("output", ONNX_TYPE[act], ["N", H])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(C.NODE_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def main(case: str) -> dict:
    import tensorrt_rtx as trt

    if case == "no-shim":  # reproduce the abort: leave libtensorrt_rtx.so unresolvable
        trt_python_plugin.ensure_rtx_core_library = lambda trt: "skipped"
    creator = trt_python_plugin.register(trt)
    log = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    result: dict = {"parsed": bool(parser.parse(model(case).SerializeToString()))}
    result["errors"] = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    result["layer_types"] = sorted({str(network.get_layer(i).type) for i in range(network.num_layers)})
    # what feeds the plugin: the types of the constants the parser made of the initializers
    result["constant_types"] = [
        str(network.get_layer(i).get_output(0).dtype)
        for i in range(network.num_layers)
        if network.get_layer(i).type == trt.LayerType.CONSTANT
    ]
    if result["parsed"]:
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for name, width in (("hidden", H), ("router_logits", E)):
            profile.set_shape(name, (1, width), (16, width), (64, width))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        result["engine_bytes"] = None if engine is None else engine.nbytes
    result["plugins_created"] = len(creator.created)
    result["callbacks"] = [entry for plugin in creator.created[:1] for entry in plugin.log]
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
