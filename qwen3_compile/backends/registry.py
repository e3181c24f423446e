"""Which runner executes an artifact: one table for `validate`, `run`, the bundle's reference tokens and the
benchmarks. A backend is a name and a loader; nothing outside `backends/` branches on the runtime."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from qwen3_compile.backends.base import CausalLMRunner
from qwen3_compile.backends.onnxruntime.loader import load_ort_runner
from qwen3_compile.backends.tensorrt.loader import load_tensorrt_runner
from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.manifests import EngineManifest, Manifest

RunnerLoader = Callable[[Path, Manifest], CausalLMRunner]

BACKENDS: dict[str, RunnerLoader] = {
    "ort": load_ort_runner,
    "ort-cuda": partial(load_ort_runner, device="cuda"),
    "tensorrt": partial(load_tensorrt_runner, backend="tensorrt"),
    "tensorrt-rtx": partial(load_tensorrt_runner, backend="tensorrt-rtx"),
}
# backend -> the ONNX Runtime device it runs on (the ORT backends share one runner, settings and bisection)
ORT_DEVICES: dict[str, str] = {"ort": "cpu", "ort-cuda": "cuda"}
# manifest stage -> the backend that runs it when none is asked for (`build`: the flavour it was built with)
STAGE_BACKENDS: dict[str, str] = {"export": "ort", "quantize": "ort", "lower": "ort", "build": "tensorrt"}


def default_backend(manifest: Manifest) -> str | None:
    if isinstance(manifest, EngineManifest):
        return manifest.tensorrt.flavour
    return STAGE_BACKENDS.get(manifest.stage)


def open_runner(folder: Path, manifest: Manifest, backend: str | None = None) -> CausalLMRunner:
    """A runner for the artifact in `folder` on `backend` (default: the one its stage runs on)."""
    chosen = backend or default_backend(manifest)
    if chosen is None:
        raise BadInputError(
            f"a '{manifest.stage}' artifact cannot be run: runnable stages are "
            f"{', '.join(sorted(STAGE_BACKENDS))}.",
            file=Path(folder) / "manifest.json",
            field="stage",
            fix="pass a folder written by `qwen3-compile export`, `quantize`, `lower`, `build` or `compile`.",
        )
    if chosen not in BACKENDS:
        raise BadInputError(
            f"unknown backend '{chosen}'.", field="--backend", fix=f"use one of: {', '.join(BACKENDS)}."
        )
    return BACKENDS[chosen](Path(folder), manifest)
