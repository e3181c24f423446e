"""Hostile archives and folders, built by the tests with tarfile, and the checks every refusal shares:
exit code 2, no traceback, nothing left in the destination, nothing written outside it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

DEVICE = Path(__file__).parents[2] / "qwen3_compile" / "bundle" / "device"
RUNNER = DEVICE / "runner.py"


KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}


@dataclass(frozen=True)
class Entry:
    """One archive member: `data` for files, `link` for links, `size` to declare more than `data` holds."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    size: int | None = None


def records(files: dict[str, bytes]) -> dict[str, dict]:
    """The manifest's `files` entries of these contents."""
    return {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()}


def header(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.type, info.linkname = KINDS[entry.kind], entry.link
    info.mode = 0o755 if entry.kind == "dir" else 0o644
    info.size = len(entry.data) if entry.size is None else entry.size
    if entry.kind != "file":
        info.size = 0
    return info


def tar_bytes(entries: list[Entry], manifest: dict | None = None) -> bytes:
    """An uncompressed tar: manifest.json first (when given), then `entries` in order. A file whose declared
    size is larger than its data ends the archive there (what a truncated or crafted archive looks like)."""
    out = io.BytesIO()
    if manifest is not None:
        entries = [Entry("manifest.json", data=json.dumps(manifest).encode()), *entries]
    for entry in entries:
        info = header(entry)
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if entry.kind == "file":
            out.write(entry.data[: info.size])
            if info.size > len(entry.data):
                return out.getvalue()
            out.write(b"\0" * (-info.size % tarfile.BLOCKSIZE))
    return out.getvalue() + b"\0" * (2 * tarfile.BLOCKSIZE)


def write_archive(path: Path, entries: list[Entry], manifest: dict | None = None) -> Path:
    path.write_bytes(gzip.compress(tar_bytes(entries, manifest), compresslevel=1))
    return path


def write_bomb(
    path: Path, declared: int, before: list[Entry], manifest: dict | None, pax: bool = False
) -> Path:
    """A .tar.gz of about declared/1000 bytes holding a member of `declared` zero bytes (`pax`: a PAX
    header that size, which tarfile would read into memory at once): gzip members may be concatenated, so
    one compressed MiB of zeros repeated expands to `declared` bytes."""
    assert declared % (1 << 20) == 0
    head = tar_bytes([*before, Entry("model/model.onnx.data", size=declared)], manifest)
    if pax:
        info = tarfile.TarInfo("PaxHeaders/model.onnx.data")
        info.type, info.size = tarfile.XHDTYPE, declared
        head = tar_bytes(before, manifest)[: -2 * tarfile.BLOCKSIZE] + info.tobuf(tarfile.USTAR_FORMAT)
    mib = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(head))
        for _ in range(declared >> 20):
            f.write(mib)
        f.write(gzip.compress(b"\0" * (2 * tarfile.BLOCKSIZE)))
    return path


def tree(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` (links not followed) with its kind, size and content hash."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            found[path.relative_to(folder).as_posix()] = (st.st_mode, st.st_size, st.st_nlink, digest)
    return found


def verify_cli(target: Path, *options: str):
    from qwen3_compile.cli import main

    return CliRunner().invoke(main, ["verify-bundle", str(target), *options])


def run_device(script: Path, *args: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    cmd = [sys.executable, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def assert_clean_refusal(output: str, code: int, *names: str) -> None:
    """Exit code 2, one message naming what was refused and the fix, no traceback."""
    assert code == 2, output
    assert "Traceback" not in output and "Fix:" in output, output
    for name in names:
        assert name in output, (name, output)
