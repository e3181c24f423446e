"""How ONNX Runtime must run an artifact, as its manifest records it: every ORT session the toolchain opens
on an artifact (validation, bisection, generation, the bundled runner) takes its options from here.

- `ort_optimization`: FP8 QDQ graphs ask for ENABLE_BASIC; ORT CPU computes FP8 QDQ MatMuls wrongly at
  the higher levels (DESIGN.md section 3).
- `ort_session_config`: session config entries, chosen by `quantize --ort-qdq`:
  - `reference` (the default): `session.disable_quant_qdq=1`, ORT runs the QDQ graph as written. Weights are
    dequantized once at load and held in float, so the numbers are the recipe's own. Without it, at
    ENABLE_ALL ORT fuses each INT8 DequantizeLinear -> MatMul into MatMulNBits at accuracy level 4, which
    quantizes the activations to int8 as well: a weight-only recipe ran as W8A8 (tiny-moe int8-wo: mean KL
    0.0109 against 0.0056).
  - `fused`: ORT's QDQ fusions with MatMulNBits at accuracy level 4, stated explicitly: INT8 weights stay
    int8 in memory, weight-only MatMuls quantize their activations per block.
  Measured side by side on ORT CPU (README, Quantization): `reference` costs float weights in memory, not
  speed (int8-sq decodes 2x faster than fused; int8-wo within noise).
"""

from __future__ import annotations

from typing import Any

LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_ALL"}
# What the quantize stage records per --ort-qdq; an artifact without a record runs at ORT's defaults.
ORT_QDQ = {
    "reference": {"session.disable_quant_qdq": "1"},
    "fused": {"session.qdq_matmulnbits_accuracy_level": "4"},
}


def ort_optimization(manifest) -> str:
    """What the artifact records (quantize and lower manifests); an export runs at ORT's default."""
    return getattr(manifest, "ort_optimization", "all")


def ort_session_config(manifest) -> dict[str, str]:
    return dict(getattr(manifest, "ort_session_config", {}))


def session_options(
    optimization: str = "all", config: dict[str, str] | None = None, threads: int | None = None
):
    import onnxruntime as ort

    if optimization not in LEVELS:
        raise ValueError(f"ORT optimization level {optimization!r} is not one of {list(LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[optimization])
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    return options


def manifest_session_options(manifest: dict[str, Any], threads: int | None = None):
    return session_options(ort_optimization(manifest), ort_session_config(manifest), threads)
