"""`verify-bundle`: a bundle's files against its manifest (sha256 and size of each, nothing missing or
added) and, when given, a device's TensorRT version and SM against the bundle's target.

A .tar.gz is extracted into a temporary folder with the device's own safe extraction (absolute paths,
`..` and links escaping the folder are refused before anything is written); a folder is checked in place.
"""

from __future__ import annotations

import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_compile.bundle.device.bundle_files import (
    BundleError,
    check_compatibility,
    check_files,
    safe_extract,
)
from qwen3_compile.errors import BadInputError, CheckFailedError
from qwen3_compile.schema import decode
from qwen3_compile.storage.manifests import BundleManifest


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: BundleManifest = field(repr=False)
    files: int
    checked_trt: str | None
    checked_sm: str | None


def _checked(folder: Path, source: Path, device_outputs: bool) -> dict[str, Any]:
    try:
        return check_files(folder, device_outputs)
    except BundleError as err:
        raise CheckFailedError(
            f"{err.file}: {err.problem}.",
            file=source,
            field=err.file,
            fix="do not use this bundle: copy it again from where it was made, or make it again.",
        ) from None


def verify_bundle(path: str | Path, trt_version: str | None = None, sm: str | None = None) -> VerifiedBundle:
    """Raise CheckFailedError naming the first bad file, or the incompatibility; else the manifest."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(
            "the bundle does not exist.", file=path, fix="pass a .tar.gz written by `bundle`."
        )
    if path.is_dir():
        manifest = _checked(path, path, device_outputs=True)  # an extracted folder the device used
    else:
        with tempfile.TemporaryDirectory(prefix="qwen3-bundle-verify-") as tmp:
            try:
                safe_extract(path, tmp)
            except BundleError as err:
                raise CheckFailedError(
                    f"{err.file}: {err.problem}.",
                    file=path,
                    field=err.file,
                    fix="do not extract this archive; make the bundle again with `qwen3-compile bundle`.",
                ) from None
            except (tarfile.TarError, OSError, EOFError) as err:  # not a (complete) .tar.gz
                raise BadInputError(f"cannot read the archive ({err}).", file=path) from None
            manifest = _checked(Path(tmp), path, device_outputs=False)  # an archive: nothing prebuilt
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
