"""Reproducible .tar.gz: the same folder gives the same bytes.

manifest.json first (extraction checks every later member against it from its header), then the entries
sorted by path, regular files and folders only (no links), fixed mtime, uid/gid 0 without names, modes 0644
or 0755 (executables), ustar headers (no PAX timestamps), gzip with mtime 0, no file name and a fixed level.
Extraction is `device/bundle_files.safe_extract` (the device runs the same code).
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from pathlib import Path
from typing import BinaryIO

from qwen3_compile.bundle.device.bundle_files import MANIFEST, safe_extract  # noqa: F401  (re-exported)

FIXED_MTIME = 1_700_000_000  # 2023-11-14: any constant; 0 upsets some tools
GZIP_LEVEL = 1  # weights barely compress (72.5 vs 72.3 MB at level 6 on tiny-moe); level 1 is faster


def folder_files(folder: Path) -> list[str]:
    """Every regular file under `folder`, POSIX paths relative to it, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


class _HashingWriter:
    """A binary file that hashes the bytes written through it (the archive is not read back to hash it)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.digest = raw, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def write_reproducible_tar(folder: Path, output: Path) -> str:
    """Write `folder`'s files to `output` (.tar.gz) reproducibly; returns the archive's sha256 (hex)."""
    with open(output, "wb") as raw:
        hashing = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, compresslevel=GZIP_LEVEL, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                dirs_written: set[str] = set()
                for name in sorted(folder_files(folder), key=lambda n: n != MANIFEST):  # manifest first
                    parts = name.split("/")[:-1]
                    for depth in range(1, len(parts) + 1):  # parent folders, once, before their files
                        parent = "/".join(parts[:depth])
                        if parent not in dirs_written:
                            tar.addfile(_info(parent, tarfile.DIRTYPE, 0o755))
                            dirs_written.add(parent)
                    path = folder / name
                    executable = path.stat().st_mode & 0o111
                    info = _info(name, tarfile.REGTYPE, 0o755 if executable else 0o644)
                    info.size = path.stat().st_size
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
    return hashing.digest.hexdigest()


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
