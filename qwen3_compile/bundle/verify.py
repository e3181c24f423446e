"""`verify-bundle`: a bundle's files against its manifest (sha256 and size of each, nothing missing or
added, no link or special file) and, when given, a device's TensorRT version and SM against the target.

A .tar.gz is extracted into a temporary folder with the device's own safe extraction (bundle_files.py:
the manifest first, every member checked from its header against it and the limits, nothing written
outside, nothing left behind); a folder is checked in place without following links.
Exit codes: 2 when the bundle is refused (unsafe or malformed), 1 when a file differs from its manifest.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qwen3_compile.bundle.device.bundle_files import (
    DEFAULT_LIMITS,
    BundleError,
    Limits,
    check_compatibility,
    check_files,
    read_manifest,
    safe_extract,
)
from qwen3_compile.errors import BadInputError, CheckFailedError, Qwen3CompileError
from qwen3_compile.schema import decode
from qwen3_compile.storage.manifests import BundleManifest


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: BundleManifest = field(repr=False)
    files: int
    checked_trt: str | None
    checked_sm: str | None


def _as_error(err: BundleError, source: Path) -> Qwen3CompileError:
    kind = BadInputError if err.exit_code == 2 else CheckFailedError
    problem = f"{err.file}: {err.problem}." if err.file else f"{err.problem}."
    return kind(problem, file=source, field=err.file, fix=err.fix)


def verify_bundle(
    path: str | Path, trt_version: str | None = None, sm: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> VerifiedBundle:
    """Raise BadInputError (refused) or CheckFailedError (a changed, missing or added file; the
    incompatibility) naming the first bad file; else the typed manifest."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(
            "the bundle does not exist.", file=path, fix="pass a .tar.gz written by `bundle`."
        )
    try:
        if path.is_dir():
            manifest = check_files(path, device_outputs=True, limits=limits)  # a folder the device used
        else:
            with tempfile.TemporaryDirectory(prefix="qwen3-bundle-verify-") as tmp:
                safe_extract(path, Path(tmp) / "bundle", limits)  # checks every file; nothing prebuilt
                manifest = read_manifest(Path(tmp) / "bundle")
    except BundleError as err:
        raise _as_error(err, path) from None
    problems = check_compatibility(manifest, trt_version, sm)
    if problems:
        raise CheckFailedError(
            "; ".join(problems) + ".",
            file=path,
            field="target",
            fix=f"make a bundle for this device's target (the bundle is for {manifest['target']['name']}).",
        )
    typed = decode(BundleManifest, manifest, file=path)
    return VerifiedBundle(path, typed, len(typed.files), trt_version, sm)
