"""The qmoe plugin as a Python IPluginV3 inside TensorRT-RTX's ONNX parser and builder (CPU only).

Each case runs in a subprocess (tests/kernels/trt_plugin_probe.py): TensorRT aborts the process on some
errors, which must fail one test, not the session. Nothing here executes an engine: TensorRT-RTX builds
on the CPU, but no engine can run on this project's machines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install 'qwen3-compile[rtx]')")

from qwen3_compile.kernels import trt_contract as C  # noqa: E402
from qwen3_compile.kernels.trt_python_plugin import attributes_from_fields  # noqa: E402

PROBE = Path(__file__).with_name("trt_plugin_probe.py")
ROOT = Path(__file__).resolve().parents[2]


def probe(case: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QWEN3_COMPILE_KERNEL_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(PROBE), case], capture_output=True, text=True, env=env, timeout=600
    )


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"probe exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["bf16", "fp16", "int8", "int4"])
def test_engine_builds_with_the_plugin_node(case, tmp_path):
    res = result_of(probe(case, tmp_path))
    assert res["parsed"], res["errors"]
    assert "LayerType.PLUGIN_V3" in res["layer_types"]
    assert res["plugins_created"] == 1
    assert res["engine_bytes"] and res["engine_bytes"] > 0, "build_serialized_network returned None"
    calls = res["callbacks"]
    # The builder asked the plugin for its outputs, configured it with the node's shapes (N dynamic)
    # and sized its workspace for the profile's largest N (64 tokens).
    assert "get_output_shapes" in calls and "get_output_data_types" in calls
    n_in = 6 if case in ("int8", "int4") else 4
    if case == "int4":  # the parser hands the plugin the INT4 initializers as kINT4 constants (packed bytes)
        assert res["constant_types"][:2] == ["DataType.INT4", "DataType.INT4"], res["constant_types"]
    configured = [c for c in calls if c.startswith("configure_plugin")]
    assert configured and configured[0].count("(") == n_in  # one shape per input
    assert configured[0].startswith("configure_plugin [(-1, 128), (-1, 16), (16, 128, 128), (16, 128, 64)")
    assert f"get_workspace_size {C.workspace_bytes(64, 16, 2, 128, 64)}" in calls


def test_unsupported_input_dtype_fails_the_build_cleanly(tmp_path):
    res = result_of(probe("fp32-hidden", tmp_path))  # the kernels take fp16/bf16 activations only
    assert res["parsed"] and res["engine_bytes"] is None


def test_int4_groups_the_kernels_do_not_take_fail_the_build_cleanly(tmp_path):
    res = result_of(probe("int4-group16", tmp_path))  # configure_plugin refuses G = 16
    assert res["parsed"] and res["engine_bytes"] is None


def test_unsupported_attribute_is_a_parse_error(tmp_path):
    res = result_of(probe("gelu", tmp_path))
    assert not res["parsed"]
    assert any("Qwen3MoE" in e and "Could not create the plugin" in e for e in res["errors"]), res["errors"]


def test_parser_aborts_without_the_unversioned_core_library(tmp_path):
    """Why register() builds a shim: TensorRT-RTX 1.7.1's parser dlopen()s 'libtensorrt_rtx.so' when it
    imports a plugin node; the wheel ships only libtensorrt_rtx.so.1, and the failed dlopen aborts."""
    proc = probe("no-shim", tmp_path)
    if proc.returncode == 0:
        pytest.skip(
            "libtensorrt_rtx.so resolves here without the shim (on LD_LIBRARY_PATH, or a fixed wheel)"
        )
    assert proc.returncode == -signal.SIGABRT, proc.stderr[-2000:]
    assert "terminate called" in proc.stderr


def test_attributes_round_trip_through_plugin_fields():
    import numpy as np
    import tensorrt_rtx as trt

    from qwen3_compile.kernels.trt_python_plugin import plugin_classes

    want = C.MoeAttributes(top_k=8, normalize=False)
    plugin = plugin_classes(trt)[0](want)
    # What an engine stores, read back as the creator reads it when the engine is deserialised. The
    # arrays behind PluginFields must stay alive (a temporary would be freed before TensorRT copies it).
    assert attributes_from_fields(plugin.get_fields_to_serialize()) == want
    data = (np.array([8], np.int32), np.array([0], np.int32), np.frombuffer(b"silu\0", np.int8))
    kinds = (trt.PluginFieldType.INT32, trt.PluginFieldType.INT32, trt.PluginFieldType.CHAR)
    names = ("top_k", "normalize", "activation")
    fields = trt.PluginFieldCollection(
        [trt.PluginField(n, d, k) for n, d, k in zip(names, data, kinds, strict=True)]
    )
    assert attributes_from_fields(fields) == want
    with pytest.raises(ValueError, match="top_k"):
        attributes_from_fields(trt.PluginFieldCollection([]))
