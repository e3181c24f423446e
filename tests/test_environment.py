"""Reports name the software they were computed with: the recorded versions are the imported modules' own."""

import numpy
import onnx
import onnxruntime
import torch
import transformers

from qwen3_compile.environment import environment


def test_environment_names_the_imported_versions():
    env = environment()
    packages = env["packages"]
    assert packages["torch"] == torch.__version__
    assert packages["transformers"] == transformers.__version__
    assert packages["onnx"] == onnx.__version__
    assert packages["numpy"] == numpy.__version__
    runtime = packages.get("onnxruntime") or packages.get("onnxruntime-gpu")
    assert runtime == onnxruntime.__version__
    assert env["machine"] and env["processor"]
