"""TensorRT / TensorRT-RTX engine build: one small module per job.

`inputs` (what build accepts, recipe/target checks), `memory` (fit before building), `network` (plugins,
parse), `profiles` (prefill/decode shapes), `plan` (config, timing cache, build), `log` (build.log), `stage`
(the entry). The TensorRT flavour shim is `backends/tensorrt/shim.py`; the MoE lowering is
`lower/for_tensorrt.py`.
"""

from qwen3_compile.engine.stage import BuildOptions, BuiltEngine, build_engine

__all__ = ["BuildOptions", "BuiltEngine", "build_engine"]
