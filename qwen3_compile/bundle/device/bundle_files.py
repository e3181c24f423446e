"""Bundle file helpers that run on the device: safe extraction and checksum checks. Standard library only.

This file ships inside every bundle (next to runner.py and build_engine.py) and is imported by the
`qwen3_compile.bundle` package too, so the host's `verify-bundle` and the device run the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path, PurePosixPath

MANIFEST = "manifest.json"
DEVICE_OUTPUTS = ("build/", "engine/")


class BundleError(Exception):
    """A bundle that must not be used: unsafe member, bad checksum, missing or unlisted file."""

    def __init__(self, problem: str, file: str | None = None):
        self.problem, self.file = problem, file
        super().__init__(f"{file}: {problem}" if file else problem)


def _member_error(member: tarfile.TarInfo) -> str | None:
    """Why `member` must not be extracted, or None. Absolute names, `..` components, links whose target
    leaves the folder, and anything but regular files, folders and links are refused."""
    name = member.name
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in path.parts:
        return "'..' in the path"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        if target.is_absolute() or member.linkname.startswith("/"):
            return f"link to an absolute path ({member.linkname})"
        # a symlink resolves from its own folder, a hard link from the archive root
        base = path.parent if member.issym() else PurePosixPath(".")
        depth = len([p for p in base.parts if p not in ("", ".")])
        for part in target.parts:
            if part == "..":
                depth -= 1
                if depth < 0:
                    return f"link escaping the folder ({member.linkname})"
            elif part not in ("", "."):
                depth += 1
        return None
    if not (member.isfile() or member.isdir()):
        return "not a regular file, folder or link"
    return None


def safe_extract(archive: str | Path, dest: str | Path) -> list[str]:
    """Extract `archive` (a .tar.gz) into `dest` after checking every member; nothing is written when a
    member is unsafe. Returns the extracted file names (POSIX, relative to `dest`)."""
    dest = Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            why = _member_error(member)
            if why is not None:
                raise BundleError(f"refused to extract: {why}", file=member.name)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for member in members:
            target = (dest / member.name).resolve()
            if target != root and root not in target.parents:  # a link placed earlier redirects a path
                raise BundleError("refused to extract: path leaves the folder through a link", member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
                os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
            elif member.issym():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(member.linkname, target)
            else:  # hard link: a copy of an already extracted member
                source = (dest / member.linkname).resolve()
                target.write_bytes(source.read_bytes())
    return [m.name for m in members if m.isfile()]


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError("the bundle has no manifest", file=MANIFEST)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"not valid JSON ({err.msg})", file=MANIFEST) from None


def check_files(folder: str | Path, device_outputs: bool = True) -> dict:
    """Every file the manifest lists exists with its sha256 and size; no file is unlisted. Returns the
    manifest; raises BundleError naming the first bad file. `device_outputs`: allow build/ and engine/
    (what the device writes after extraction); a fresh archive must not carry them (a prebuilt plugin
    library there would be loaded by the runner without any checksum)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = manifest.get("files") or {}
    for name, entry in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise BundleError("listed in the manifest but missing", file=name)
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise BundleError("sha256 differs from the manifest (the file was changed)", file=name)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    unlisted = present - set(listed) - {MANIFEST}
    extra = sorted(e for e in unlisted if not (device_outputs and e.startswith(DEVICE_OUTPUTS)))
    if extra:
        raise BundleError("not listed in the manifest (an added file)", file=extra[0])
    return manifest


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_compatibility(manifest: dict, trt_version: str | None, sm: str | None) -> list[str]:
    """Problems running this bundle with TensorRT `trt_version` on a GPU of compute capability `sm`
    (either may be None: not checked). Empty when compatible."""
    target = manifest["target"]
    problems = []
    if trt_version is not None and version_tuple(trt_version) < version_tuple(target["min_tensorrt"]):
        problems.append(
            f"TensorRT {trt_version} is older than {target['name']}'s minimum {target['min_tensorrt']}"
        )
    if sm is not None and version_tuple(sm) != version_tuple(target["sm"]):
        problems.append(f"SM {sm} is not {target['name']}'s SM {target['sm']} (engines are per GPU)")
    return problems
