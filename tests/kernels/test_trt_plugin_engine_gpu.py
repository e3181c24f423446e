"""The qmoe TensorRT plugin executed inside an engine (gpu): INT4 weight-only experts, the path whose engine
build is tested on the CPU (test_trt_python_plugin.py, case int4) but whose enqueue has never run.

TensorRT receives the INT4 initializers as kINT4 constants (its ONNX parser copies ONNX's packed bytes
unchanged) and hands the plugin their device buffers; this test is what would show that the bytes at
enqueue are still the ONNX packing qmoe reads. It needs a TensorRT runtime that executes engines on this
GPU: standard TensorRT (not installable from PyPI here), or TensorRT-RTX on a GPU it supports (1.7.1 refuses
SM 9.0, the H200). Where there is none it skips, saying so: nothing here reports a run that did not happen.

    PYTHONPATH=. python3 -m pytest -m gpu tests/kernels/test_trt_plugin_engine_gpu.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

PROBE = Path(__file__).with_name("trt_plugin_probe.py")


def _runtime_module() -> tuple[str | None, str]:
    """(module name of a TensorRT that can run an engine on this GPU, or None; why not)."""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt", ""
    if importlib.util.find_spec("tensorrt_rtx") is None:
        return None, "no TensorRT runtime (standard TensorRT is not installable from PyPI; no tensorrt_rtx)"
    try:
        import torch

        major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else None
    except Exception:  # no usable CUDA
        major = None
    if major is None or major == 9:
        return None, "TensorRT-RTX 1.7.1 refuses SM 9.0 (and no CUDA GPU otherwise): no engine can run here"
    return "tensorrt_rtx", ""


RUNTIME, WHY_NOT = _runtime_module()


def _probe_module():
    spec = importlib.util.spec_from_file_location("trt_plugin_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu
@pytest.mark.skipif(RUNTIME is None, reason=WHY_NOT or "no TensorRT runtime")
def test_int4_plugin_engine_matches_the_float64_reference():
    import ml_dtypes
    import torch
    from onnx import numpy_helper

    from qwen3_compile.kernels.moe import moe_reference, pack_int4
    from qwen3_compile.kernels.trt_python_plugin import register

    trt = importlib.import_module(RUNTIME)
    probe = _probe_module()
    model = probe.model("int4")  # bf16 activations, fp32 logits, INT4 experts in groups of 32, fp16 scales
    register(trt)
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    parsed = parser.parse(model.SerializeToString())
    assert parsed, [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, width in (("hidden", probe.H), ("router_logits", probe.E)):
        profile.set_shape(name, (1, width), (16, width), (64, width))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine = trt.Runtime(log).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {
        name: pack_int4(torch.from_numpy(inits[name].astype(ml_dtypes.int4).astype(np.int8)))
        for name in ("gate_up_weight", "down_weight")
    }
    scales = {
        name: torch.from_numpy(inits[name].astype(np.float32)) for name in ("gate_up_scale", "down_scale")
    }
    seed = int(np.random.default_rng().integers(1 << 31))
    torch.manual_seed(seed)
    eps = float(torch.finfo(torch.bfloat16).eps)
    for n in (1, 7, 64):
        x = torch.randn(n, probe.H, device="cuda").to(torch.bfloat16)
        logits = torch.randn(n, probe.E, device="cuda")
        out = torch.full((n, probe.H), float("nan"), device="cuda", dtype=torch.bfloat16)
        context.set_input_shape("hidden", (n, probe.H))
        context.set_input_shape("router_logits", (n, probe.E))
        for name, tensor in (("hidden", x), ("router_logits", logits), ("output", out)):
            context.set_tensor_address(name, tensor.data_ptr())
        assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        ref = moe_reference(
            x.cpu(),
            logits.cpu(),
            weights["gate_up_weight"],
            weights["down_weight"],
            probe.K,
            True,
            scales["gate_up_scale"],
            scales["down_scale"],
        )
        got = out.float().cpu().double()
        rel = float((got - ref).norm() / ref.norm())
        print(f"seed {seed} N={n}: rel err {rel:.3e}")
        assert torch.isfinite(got).all() and rel <= 2 * eps, f"seed {seed}, N={n}: {rel:.3e} > 2 eps"
