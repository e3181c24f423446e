"""Open a compiled artifact folder for generation: check it, load its tokenizer and a runner for it.

Which runner runs a folder is the backend registry's choice (`backends.registry`): by default the one its
manifest's stage runs on. Callers (the decode loop, `run`) only see `CausalLMRunner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_compile.backends.base import CausalLMRunner
from qwen3_compile.backends.registry import DEFAULT_RUNNER_OPTIONS, RunnerOptions, open_runner
from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.manifest import MANIFEST, read_manifest
from qwen3_compile.storage.manifests import Manifest

EXPORT_MODEL_FILE = "model.onnx"  # the graph file of export, quantize and lower folders
_PASS_EXPORT = (
    "pass a folder written by `qwen3-compile export` or `compile` (e.g. artifacts/tiny-moe/onnx-ort)"
)


@dataclass(frozen=True)
class ChatArtifact:
    folder: Path
    manifest: Manifest = field(repr=False)
    runner: CausalLMRunner
    tokenizer: Any = field(repr=False)
    max_positions: int | None  # context limit recorded at export

    @property
    def stage(self) -> str:
        return self.manifest.stage


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


def _max_positions(manifest: Manifest) -> int | None:
    """The context limit recorded at export, carried by every stage after it."""
    return getattr(getattr(manifest, "options", None), "max_positions", None)


def open_chat_artifact(
    folder: str | Path, backend: str | None = None, options: RunnerOptions = DEFAULT_RUNNER_OPTIONS
) -> ChatArtifact:
    """Check `folder`, then load its tokenizer (the folder's own, else the packaged Qwen3 one) and runner
    (on `backend`, default: the one its stage runs on; `options`: registry.RunnerOptions)."""
    from qwen3_compile.tokenizer import load_tokenizer

    folder = Path(folder)
    _check_folder(folder)
    manifest = read_manifest(folder)
    runner = open_runner(folder, manifest, backend, options)
    return ChatArtifact(folder, manifest, runner, load_tokenizer(folder), _max_positions(manifest))
