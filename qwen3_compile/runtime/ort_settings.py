"""How ONNX Runtime must run an artifact, as its manifest records it: every ORT session the toolchain opens
on an artifact (validation, bisection, generation, the bundled runner) takes its options from here.

- `ort_optimization`: FP8 QDQ graphs ask for ENABLE_BASIC; ORT CPU computes FP8 QDQ MatMuls wrongly at
  the higher levels (DESIGN.md section 3).
- `ort_session_config`: session config entries. Quantized artifacts pin
  `session.qdq_matmulnbits_accuracy_level` to 1 (fp32 activations): at ENABLE_ALL ORT fuses each INT8
  DequantizeLinear -> MatMul into MatMulNBits at accuracy level 4 by default, which quantizes the
  activations to int8 as well, so a weight-only recipe would run as W8A8 and move logits by up to 0.045 on
  tiny-moe (tests/quantize/test_int8_weight_only.py). The recipe, not ORT's default, decides which
  activations are quantized.
"""

from __future__ import annotations

from typing import Any

LEVELS = ("disabled", "basic", "all")
# What the quantize stage records; an artifact without it runs at ORT's defaults.
QUANTIZED_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def ort_optimization(manifest: dict[str, Any]) -> str:
    return manifest.get("ort_optimization", "all")


def ort_session_config(manifest: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (manifest.get("ort_session_config") or {}).items()}


def session_options(
    optimization: str = "all", config: dict[str, str] | None = None, threads: int | None = None
):
    import onnxruntime as ort

    if optimization not in LEVELS:
        raise ValueError(f"ORT optimization level {optimization!r} is not one of {LEVELS}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    return options


def manifest_session_options(manifest: dict[str, Any], threads: int | None = None):
    return session_options(ort_optimization(manifest), ort_session_config(manifest), threads)
