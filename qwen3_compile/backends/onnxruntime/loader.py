"""Open an ONNX artifact folder (export, quantize, or lowered for ONNX Runtime) as an `OrtRunner`, with the
session settings its manifest records."""

from __future__ import annotations

from pathlib import Path

from qwen3_compile.backends.base import CausalLMRunner
from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.manifests import LowerManifest, Manifest

MODEL_FILE = "model.onnx"
# stages whose folder holds a graph ONNX Runtime runs as is (a `lower` folder only when lowered for ORT)
ORT_STAGES = ("export", "quantize", "lower")


def check_runs_on_ort(folder: Path, manifest: Manifest) -> None:
    stage = manifest.stage
    lowered_for = manifest.lowering.runtime if isinstance(manifest, LowerManifest) else None
    if stage not in ORT_STAGES or (stage == "lower" and lowered_for != "ort"):
        what = f"lowered for {lowered_for}" if stage == "lower" else f"a '{stage}' artifact"
        raise BadInputError(
            f"ONNX Runtime runs export, quantize and `lower --for ort` folders; this one is {what}.",
            file=folder / "manifest.json",
            field="stage",
            fix="pass a folder written by `qwen3-compile export`, `quantize`, `lower --for ort` or "
            "`compile`.",
        )


def load_ort_runner(
    folder: Path,
    manifest: Manifest,
    device: str = "cpu",
    *,
    static_cache_length: int | None = None,
    enable_cuda_graph: bool = False,
) -> CausalLMRunner:
    """The folder's model.onnx on ONNX Runtime (`device` "cpu" or "cuda"), run as its manifest records;
    `static_cache_length` / `enable_cuda_graph`: OrtRunner's static KV cache and CUDA graph capture (graphs
    lowered with --attention gqa)."""
    check_runs_on_ort(folder, manifest)
    model = folder / MODEL_FILE
    if not model.is_file():
        listed = MODEL_FILE in manifest.outputs
        raise BadInputError(
            f"the artifact has no {MODEL_FILE}{' although its manifest lists it' if listed else ''}.",
            file=model,
            field=f"outputs.{MODEL_FILE}",
            fix="re-run the stage that wrote this folder (`qwen3-compile export`, `quantize` or `compile`).",
        )
    try:
        from qwen3_compile.backends.onnxruntime.runner import OrtRunner
    except ImportError:
        raise BadInputError(
            "ONNX Runtime is not installed.",
            field="backend",
            fix="pip install onnxruntime (or onnxruntime-gpu).",
        ) from None
    from qwen3_compile.backends.onnxruntime.settings import (
        ort_optimization,
        ort_session_config,
        require_cuda_provider,
    )

    if device == "cuda":
        require_cuda_provider()
    return OrtRunner(
        model,
        ort_optimization(manifest),
        session_config=ort_session_config(manifest),
        device=device,
        static_cache_length=static_cache_length,
        enable_cuda_graph=enable_cuda_graph,
    )
