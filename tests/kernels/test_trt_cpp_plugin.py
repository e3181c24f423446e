"""The C++ TensorRT plugin (plugins/moe/trt/qmoe_trt_plugin.cpp): compiled against TensorRT's headers and
driven through its IPluginCreatorV3One / IPluginV3 interfaces by a host-only C++ driver (no TensorRT
library, no GPU: TensorRT itself never runs here).

The headers are not part of this project. Set TENSORRT_INCLUDE_DIR to a folder with NvInferRuntime.h (a
TensorRT install's include/, or include/ of github.com/NVIDIA/TensorRT); without it the test skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qwen3_compile.kernels import build, trt_contract

TRT_INCLUDE = os.environ.get("TENSORRT_INCLUDE_DIR")
NO_HEADERS = (
    "TENSORRT_INCLUDE_DIR not set: the C++ plugin compiles against TensorRT's headers (NvInferRuntime.h)"
)
CXX = shutil.which("c++") or shutil.which("g++")


def build_trt_plugin(tensorrt_include: str, tmp_path: Path) -> build.BuiltLibrary:
    """The plugin library (qmoe_trt_plugin.cpp + the kernels, one .so with `getCreators`) for SM 9.0,
    compiled against the headers in `tensorrt_include`; it links no TensorRT library."""
    inc = Path(tensorrt_include)
    version = (inc / "NvInferVersion.h").read_bytes() if (inc / "NvInferVersion.h").is_file() else b""
    return build.compile_library(
        "libqmoe_trt_plugin",
        ("-isystem", str(inc)),
        ("90",),
        tmp_path,
        None,
        2,
        False,
        ("trt/qmoe_trt_plugin.cpp",),
        version,
    )


pytestmark = [
    pytest.mark.skipif(not TRT_INCLUDE, reason=NO_HEADERS),
    pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (CUDA toolkit absent)"),
    pytest.mark.skipif(CXX is None, reason="no host C++ compiler"),
]


def test_plugin_library_compiles_and_honours_the_v3_interfaces(tmp_path):
    assert (Path(TRT_INCLUDE) / "NvInferRuntime.h").is_file(), f"no NvInferRuntime.h in {TRT_INCLUDE}"
    lib = build_trt_plugin(TRT_INCLUDE, tmp_path)
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib.path)], capture_output=True, text=True)
    if exported.returncode == 0:
        for sym in ("getCreators", "setLoggerFinder", "qmoe_forward"):
            assert sym in exported.stdout, f"{sym} not exported"
    driver = tmp_path / "driver"
    cuda_inc = build.cuda_include_dir(build.find_nvcc())
    src = Path(__file__).with_name("trt_plugin_driver.cpp")
    cmd = [
        CXX,
        "-std=c++17",
        "-O1",
        "-isystem",
        TRT_INCLUDE,
        "-isystem",
        str(cuda_inc),
        str(src),
        "-o",
        str(driver),
    ]
    subprocess.run(cmd + ["-ldl"], check=True)
    run = subprocess.run([str(driver), str(lib.path)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
    workspace = int(run.stdout.split("workspace ")[1].split()[0])
    assert workspace == trt_contract.workspace_bytes(2048, 128, 8, 2048, 768)
