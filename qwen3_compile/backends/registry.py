"""Which runner executes an artifact: one table for `validate`, `run`, the bundle's reference tokens and the
benchmarks. A backend is a name and a loader; nothing outside `backends/` branches on the runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RunnerOptions:
    """How an ONNX Runtime runner keeps its KV cache (`run --static-cache N [--cuda-graph]`): a static cache
    of N positions, written in place (graphs lowered with --attention gqa), and CUDA graph capture of the
    decode steps (ort-cuda only). The default is the runners' own growing cache."""

    static_cache_length: int | None = None
    cuda_graph: bool = False

    @property
    def default(self) -> bool:
        return self.static_cache_length is None and not self.cuda_graph


DEFAULT_RUNNER_OPTIONS = RunnerOptions()


def default_backend(manifest: Manifest) -> str | None:
    if isinstance(manifest, EngineManifest):
        return manifest.tensorrt.flavour
    return STAGE_BACKENDS.get(manifest.stage)


def open_runner(
    folder: Path,
    manifest: Manifest,
    backend: str | None = None,
    options: RunnerOptions = DEFAULT_RUNNER_OPTIONS,
) -> CausalLMRunner:
    """A runner for the artifact in `folder` on `backend` (default: the one its stage runs on), with
    `options` (ONNX Runtime backends only)."""
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
    if options.default:
        return BACKENDS[chosen](Path(folder), manifest)
    if chosen not in ORT_DEVICES:
        raise BadInputError(
            f"--static-cache and --cuda-graph are ONNX Runtime runner options; the backend is {chosen}.",
            field="--static-cache",
            fix="drop them, or run an ONNX folder lowered with `lower --for ort --attention gqa` on ort / "
            "ort-cuda.",
        )
    if options.cuda_graph and (chosen != "ort-cuda" or options.static_cache_length is None):
        raise BadInputError(
            f"CUDA graph capture replays a decode step on the GPU from a static KV cache; the backend is "
            f"{chosen}{'' if options.static_cache_length else ', with no static cache'}.",
            field="--cuda-graph",
            fix="add --backend ort-cuda and --static-cache N (N at least the prompt plus the new tokens), "
            "or drop --cuda-graph.",
        )
    return BACKENDS[chosen](
        Path(folder),
        manifest,
        static_cache_length=options.static_cache_length,
        enable_cuda_graph=options.cuda_graph,
    )
