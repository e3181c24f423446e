"""`manifest.json`: what produced an artifact folder (inputs, options, tool versions, outputs, timings).

A later stage, a cache or a person reads it to see what made what. Output hashes let `verify` style
checks detect a damaged or edited artifact.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qwen3_compile import __version__
from qwen3_compile.errors import BadInputError
from qwen3_compile.schema import decode, encode
from qwen3_compile.storage.manifests import ARTIFACT_KINDS, AnyManifest, FileRecord, Manifest
from qwen3_compile.storage.user_files import read_text

M = TypeVar("M", bound=Manifest)

MANIFEST = "manifest.json"
CALIBRATION_FILE = "calibration.safetensors"  # a quantized artifact's calibration statistics
_TOOLS = (
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxruntime_gpu",
    "numpy",
    "safetensors",
    "tensorrt",
    "tensorrt_rtx",
)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"qwen3-compile": __version__, "python": platform.python_version()}
    for tool in _TOOLS:
        try:
            versions[tool] = importlib.metadata.version(tool.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def write_manifest(folder: Path, kind: type[M], timings: Timings, **fields: Any) -> M:
    """Hash every file in `folder`, then write the `kind` manifest listing them next to them."""
    outputs = {
        p.name: FileRecord(sha256=sha256_file(p), bytes=p.stat().st_size)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = kind(tools=tool_versions(), outputs=outputs, timings_s=dict(timings.seconds), **fields)
    text = json.dumps(encode(manifest), indent=2, sort_keys=True) + "\n"
    (folder / MANIFEST).write_text(text)
    # what the file says (lists where the stage had tuples): equal to what a later stage reads back
    return decode(kind, json.loads(text), file=folder / MANIFEST)


MAX_MANIFEST_BYTES = 64 << 20  # a real-width bundle's manifest is tens of kB


def read_manifest(folder: Path) -> AnyManifest:
    """The folder's manifest, decoded strictly into the class its `stage` names."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BadInputError(
            "the artifact has no manifest.json.",
            file=path,
            fix="pass a folder written by qwen3-compile (export, quantize, lower, build).",
        )
    try:  # Python's json reads NaN; the strict decoder below refuses it naming the field
        data = json.loads(read_text(path, MAX_MANIFEST_BYTES, _REDO, _REDO))
    except json.JSONDecodeError as err:
        raise BadInputError(f"manifest.json is not valid JSON ({err.msg}).", file=path, fix=_REDO) from None
    stage = data.get("stage") if isinstance(data, dict) else None
    if not isinstance(stage, str) or stage not in ARTIFACT_KINDS:  # a list or dict is unhashable
        raise BadInputError(
            f"the manifest names {'stage ' + repr(stage) if stage else 'no stage'}, not an artifact "
            "this toolchain reads.",
            file=path,
            field="stage",
            fix=f"pass a folder written by one of: {', '.join(ARTIFACT_KINDS)}.",
        )
    manifest = decode(ARTIFACT_KINDS[stage], data, file=path)
    for name in manifest.outputs:
        check_member_name(name, path, f"outputs.{name}")
    return manifest


def read_manifest_as(folder: Path, kind: type[M]) -> M:
    """The folder's manifest, refused unless it is a `kind` one: a stage's result read back from its folder.
    Only the manifest is read; the stage that takes the folder next checks its files (`verify_outputs`)."""
    manifest = read_manifest(folder)
    if not isinstance(manifest, kind):
        wanted = kind.__dataclass_fields__["stage"].default
        raise BadInputError(
            f"expected a folder written by `{wanted}`; this one was written by `{manifest.stage}`.",
            file=Path(folder) / MANIFEST,
            field="stage",
            fix=f"pass a folder written by `{wanted}`.",
        )
    return manifest


def check_member_name(name: str, manifest: Path, field: str) -> None:
    """A file a manifest lists is a plain relative path inside its folder: nothing absolute, no `..`, no
    backslash or NUL, no empty or `.` parts (so `folder / name` can never leave the folder)."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise BadInputError(
            f"lists {name!r}, which is not a plain relative path inside the artifact folder.",
            file=manifest,
            field=field,
            fix=_REDO,
        )


def verify_outputs(folder: Path, manifest: Manifest, required: tuple[str, ...]) -> None:
    """The files a stage is about to read are the ones its manifest lists, every one by size and sha256
    (external data included: hashing reads at ~1-2 GB/s, far less than any stage costs; a data file damaged
    with its size kept would otherwise give wrong numbers with exit 0). `required` must be listed."""
    listed = manifest.outputs
    for name, record in listed.items():
        path = Path(folder) / name
        if not path.is_file():
            raise BadInputError(
                f"{name} is listed in the manifest but missing.",
                file=path,
                field=f"outputs.{name}",
                fix=_REDO,
            )
        if path.stat().st_size != record.bytes or sha256_file(path) != record.sha256:
            raise BadInputError(
                f"{name} is not the file its manifest lists (changed or damaged since it was written).",
                file=path,
                field=f"outputs.{name}.sha256",
                fix=_REDO,
            )
    for name in required:
        if name not in listed:
            raise BadInputError(
                f"the manifest does not list {name}.",
                file=Path(folder) / MANIFEST,
                field="outputs",
                fix=_REDO,
            )


_REDO = "re-run the stage that wrote this folder; never edit an artifact in place."
