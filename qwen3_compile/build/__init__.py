"""TensorRT / TensorRT-RTX engine build: one small module per job.

`trt_import` (the flavour shim), `inputs` (what build accepts, recipe/target checks), `memory` (fit before
building), `lowering` (which MoE lowering, the lowered ONNX), `network` (plugins, parse), `profiles`
(prefill/decode shapes), `engine` (config, timing cache, build), `log` (build.log), `stage` (the entry).
"""

from qwen3_compile.build.stage import BuildOptions, BuiltEngine, build_engine

__all__ = ["BuildOptions", "BuiltEngine", "build_engine"]
