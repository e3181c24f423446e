"""Open a compiled artifact folder for generation: check it, load its tokenizer and a runner for it.

Which runner runs a folder is decided by its manifest's `stage`, through `RUNNER_LOADERS`: an export
folder runs on ONNX Runtime; a TensorRT stage adds its loader here (or via `register_runner`) and
every caller (the decode loop, `run`) works unchanged, because they only see `CausalLMRunner`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError
from qwen3_compile.manifest import MANIFEST, read_manifest
from qwen3_compile.runtime.base import CausalLMRunner

RunnerLoader = Callable[[Path, dict[str, Any]], CausalLMRunner]

EXPORT_MODEL_FILE = "model.onnx"  # the export stage's graph (export.stage.MODEL_FILE)
_PASS_EXPORT = (
    "pass a folder written by `qwen3-compile export` or `compile` (e.g. artifacts/tiny-moe/onnx-ort)"
)


def load_ort_runner(folder: Path, manifest: dict[str, Any]) -> CausalLMRunner:
    """An export folder's model.onnx on ONNX Runtime (CPU)."""
    model = folder / EXPORT_MODEL_FILE
    listed = EXPORT_MODEL_FILE in manifest.get("outputs", {})
    if not model.is_file():
        raise BadInputError(
            f"the export artifact has no {EXPORT_MODEL_FILE}"
            f"{' although its manifest lists it' if listed else ''}.",
            file=model,
            field=f"outputs.{EXPORT_MODEL_FILE}",
            fix="re-run `qwen3-compile export` (or `compile`) to write the folder again.",
        )
    try:
        from qwen3_compile.runtime.onnxruntime_runner import OrtRunner
    except ImportError:
        raise BadInputError(
            "ONNX Runtime is not installed.",
            field="backend",
            fix="pip install onnxruntime (or onnxruntime-gpu).",
        ) from None
    from qwen3_compile.runtime.ort_settings import ort_optimization, ort_session_config

    return OrtRunner(model, ort_optimization(manifest), session_config=ort_session_config(manifest))


def load_tensorrt_runner(folder: Path, manifest: dict[str, Any]) -> CausalLMRunner:
    """A `build` folder's plan on TensorRT / TensorRT-RTX (needs a GPU of the plan's target)."""
    from qwen3_compile.runtime.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(folder, manifest)


# manifest stage -> the runner that executes that kind of artifact
RUNNER_LOADERS: dict[str, RunnerLoader] = {
    "export": load_ort_runner,
    "quantize": load_ort_runner,
    "build": load_tensorrt_runner,
}


def register_runner(stage: str, loader: RunnerLoader) -> None:
    """Make artifacts whose manifest says `stage` runnable (a backend package calls this)."""
    RUNNER_LOADERS[stage] = loader


@dataclass(frozen=True)
class ChatArtifact:
    folder: Path
    manifest: dict[str, Any] = field(repr=False)
    runner: CausalLMRunner
    tokenizer: Any = field(repr=False)
    max_positions: int | None  # context limit recorded at export

    @property
    def stage(self) -> str:
        return self.manifest["stage"]


def _check_folder(folder: Path) -> None:
    if folder.is_file():
        hint = f"pass its folder: {folder.parent}" if folder.name == EXPORT_MODEL_FILE else "pass a folder"
        raise BadInputError(
            "ARTIFACT is a file, not an artifact folder.",
            file=folder,
            field="ARTIFACT",
            fix=f"{hint} (one written by `qwen3-compile export` or `compile`).",
        )
    if not folder.is_dir():
        raise BadInputError(
            "the artifact folder does not exist.",
            file=folder,
            field="ARTIFACT",
            fix=f"{_PASS_EXPORT}.",
        )
    if not (folder / MANIFEST).is_file():
        raise BadInputError(
            f"the artifact folder has no {MANIFEST}, so what made it (and how to run it) is unknown.",
            file=folder / MANIFEST,
            field="ARTIFACT",
            fix=f"{_PASS_EXPORT}, or re-export the model there.",
        )


def _max_positions(folder: Path, manifest: dict[str, Any]) -> int | None:
    limit = manifest.get("options", {}).get("max_positions")
    if limit is None and (folder / "config.json").is_file():
        limit = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    return int(limit) if limit else None


def open_chat_artifact(folder: str | Path) -> ChatArtifact:
    """Check `folder`, then load its tokenizer (the folder's own, else the packaged Qwen3 one) and runner."""
    from qwen3_compile.tokenizer import load_tokenizer

    folder = Path(folder)
    _check_folder(folder)
    manifest = read_manifest(folder)
    stage = manifest.get("stage")
    if stage not in RUNNER_LOADERS:
        runnable = ", ".join(sorted(RUNNER_LOADERS))
        what = f"a '{stage}' artifact cannot be run" if stage else "the manifest names no stage"
        raise BadInputError(
            f"{what}: `run` executes {runnable} artifacts.",
            file=folder / MANIFEST,
            field="stage",
            fix="pass the export folder of this model (`qwen3-compile export MODEL -o DIR`, or "
            "artifacts/<model>/onnx-ort written by `compile`).",
        )
    runner = RUNNER_LOADERS[stage](folder, manifest)
    return ChatArtifact(folder, manifest, runner, load_tokenizer(folder), _max_positions(folder, manifest))
