"""Which runner executes an artifact: one table for `validate`, `run`, the bundle's reference tokens and the
benchmarks. A backend is a name and a loader; nothing outside `backends/` branches on the runtime."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from qwen3_compile.backends.base import CausalLMRunner
from qwen3_compile.backends.onnxruntime.loader import load_ort_runner
from qwen3_compile.backends.tensorrt.loader import load_tensorrt_runner
from qwen3_compile.errors import BadInputError

RunnerLoader = Callable[[Path, dict[str, Any]], CausalLMRunner]

BACKENDS: dict[str, RunnerLoader] = {
    "ort": load_ort_runner,
    "tensorrt": partial(load_tensorrt_runner, backend="tensorrt"),
    "tensorrt-rtx": partial(load_tensorrt_runner, backend="tensorrt-rtx"),
}
# manifest stage -> the backend that runs it when none is asked for (`build`: the flavour it was built with)
STAGE_BACKENDS: dict[str, str] = {"export": "ort", "quantize": "ort", "lower": "ort", "build": "tensorrt"}


def default_backend(manifest: dict[str, Any]) -> str | None:
    if manifest.get("stage") == "build":
        return (manifest.get("tensorrt") or {}).get("flavour", "tensorrt")
    return STAGE_BACKENDS.get(manifest.get("stage"))


def open_runner(folder: Path, manifest: dict[str, Any], backend: str | None = None) -> CausalLMRunner:
    """A runner for the artifact in `folder` on `backend` (default: the one its stage runs on)."""
    chosen = backend or default_backend(manifest)
    if chosen is None:
        stage = manifest.get("stage")
        what = f"a '{stage}' artifact cannot be run" if stage else "the manifest names no stage"
        raise BadInputError(
            f"{what}: runnable stages are {', '.join(sorted(STAGE_BACKENDS))}.",
            file=Path(folder) / "manifest.json",
            field="stage",
            fix="pass a folder written by `qwen3-compile export`, `quantize`, `lower`, `build` or `compile`.",
        )
    if chosen not in BACKENDS:
        raise BadInputError(
            f"unknown backend '{chosen}'.", field="--backend", fix=f"use one of: {', '.join(BACKENDS)}."
        )
    return BACKENDS[chosen](Path(folder), manifest)
