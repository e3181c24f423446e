"""qwen3-compile: compile Qwen3 dense and MoE checkpoints into validated deployment artifacts.

The package imports nothing heavy at import time; stage modules pull in torch, onnx and friends when
they are used, so `qwen3-compile --help` stays fast.
"""

__version__ = "0.1.0"
