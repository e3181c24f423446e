"""Bundle file helpers that run on the device: safe extraction and checksum checks. Standard library only.

This file ships inside every bundle (next to runner.py and build_engine.py) and is imported by the
`qwen3_compile.bundle` package too, so the host's `verify-bundle` and the device run the same code.

A bundle holds regular files and folders only (the writer never makes links). Extraction reads the
manifest (the archive's first member) before anything else, checks every later member's header against
it and against the limits, extracts with tarfile's `data` filter (PEP 706) into a new sibling folder,
checks every sha256 there and only then renames that folder into place: a refusal leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import glob
import gzip
import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
DEVICE_OUTPUTS = ("build/", "engine/")
GiB = 1 << 30
# A bundle's weights must fit the device's memory (the largest Jetson, Thor, has 128 GB) and live in one
# external-data file (model/model.onnx.data), so the per-file limit is close to the total one.
MAX_FILE_BYTES = 160 * GiB
MAX_TOTAL_BYTES = 192 * GiB
MAX_FILES = 10_000  # a bundle holds about 20 to 60 files
MAX_MANIFEST_BYTES = 64 << 20  # read into memory; a 10,000-file manifest is about 2 MB
_MAX_READ = MAX_MANIFEST_BYTES  # the largest single read tarfile may ask for (a PAX or long-name header)
_FIX_REMAKE = "do not use this archive; make the bundle again with `qwen3-compile bundle`."
_FIX_LIMITS = "if this is a bundle you made and trust, raise the limit with {flag}."
FIX_FOLDER = "do not use this folder; extract the bundle again with `python3 runner.py unpack`."
_FIX_CHANGED = "do not use this bundle: copy it again from where it was made, or make it again."


@dataclass(frozen=True)
class Limits:
    """What extraction accepts, from the manifest and the headers, before anything is written."""

    total_bytes: int = MAX_TOTAL_BYTES
    file_bytes: int = MAX_FILE_BYTES
    files: int = MAX_FILES


DEFAULT_LIMITS = Limits()


class BundleError(Exception):
    """A bundle that must not be used. `file`: the member or listed path at fault; `exit_code`: 2 when it
    is refused (unsafe or malformed), 1 when a file differs from the manifest (changed, missing, added)."""

    def __init__(self, problem: str, file: str | None = None, fix: str = _FIX_REMAKE, exit_code: int = 2):
        self.problem, self.file, self.fix, self.exit_code = problem, file, fix, exit_code
        super().__init__(f"{file}: {problem}" if file else problem)


def parse_size(text: str) -> int:
    """'160G', '512M', '2T' or plain bytes -> bytes (binary units), for the limit flags."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(text[-1:], 1)
    number = float(text[:-1] if text[-1:] in units else text)
    if not 0 <= number < 1e15:  # also nan and inf
        raise ValueError(f"not a size: {text!r}")
    return int(number * scale)


# ---------------------------------------------------------------- paths and the manifest
def path_problem(name: object) -> str | None:
    """Why `name` is not a path inside the bundle, or None: relative, normalized POSIX, printable UTF-8."""
    if not isinstance(name, str) or not name:
        return "an empty or non-text path"
    if "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a backslash or control character in the path"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "a path that is not valid UTF-8"
    if name.startswith("/"):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' in the path"
    if any(p in ("", ".") for p in parts):
        return "a path that is not normalized (empty or '.' parts)"
    if len(parts[0]) == 2 and parts[0][1] == ":":
        return "a drive letter in the path"
    return None


def check_manifest(manifest: object, limits: Limits = DEFAULT_LIMITS) -> dict[str, int]:
    """The manifest's files ({path: bytes}), after checking that every path stays inside the bundle, that
    each has a sha256 and a size, and that they fit the limits. Raises BundleError naming the path."""

    def refuse(problem: str, fix: str = _FIX_REMAKE) -> BundleError:
        return BundleError(problem, file=MANIFEST, fix=fix)

    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise refuse("no 'files' object (the sha256 and size of every file)")
    if len(files) > limits.files:
        raise refuse(
            f"lists {len(files)} files, over the limit of {limits.files}",
            _FIX_LIMITS.format(flag="--max-files"),
        )
    sizes, folded = {}, {}
    for name, entry in files.items():
        why = path_problem(name)
        if why is None and name == MANIFEST:
            why = "the manifest itself"
        if why is not None:
            raise refuse(f"lists {name!r}: {why}")
        sha, size = (entry.get("sha256"), entry.get("bytes")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise refuse(f"lists {name!r} without a sha256 (64 lowercase hex digits)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise refuse(f"lists {name!r} without its size ('bytes', a whole number)")
        if size > limits.file_bytes:
            raise refuse(
                f"lists {name!r} of {size} bytes, over the per-file limit of {limits.file_bytes} bytes",
                _FIX_LIMITS.format(flag="--max-file-size"),
            )
        # names equal but for case overwrite each other on macOS and Windows file systems
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            raise refuse(f"lists both {other!r} and {name!r} (the same file on some file systems)")
        sizes[name] = size
    for name in sizes:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in sizes:
                raise refuse(f"lists {'/'.join(parts[:depth])!r} as a file and as the folder of {name!r}")
    total = sum(sizes.values())
    if total > limits.total_bytes:
        raise refuse(
            f"lists {total} bytes in all, over the limit of {limits.total_bytes} bytes",
            _FIX_LIMITS.format(flag="--max-total-size"),
        )
    return sizes


def _parse_manifest(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BundleError(f"not valid JSON ({err})", file=MANIFEST) from None


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an extracted bundle as JSON (a regular file, not a link; at most 64 MiB)."""
    path = Path(folder) / MANIFEST
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BundleError("the bundle has no manifest", file=MANIFEST) from None
    except OSError as err:  # ELOOP: a link
        raise BundleError(f"cannot be read as a regular file ({err.strerror})", file=MANIFEST) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BundleError("not a regular file", file=MANIFEST)
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"larger than {MAX_MANIFEST_BYTES} bytes", file=MANIFEST)
    manifest = _parse_manifest(data)
    if not isinstance(manifest, dict):
        raise BundleError("not a JSON object", file=MANIFEST)
    return manifest


# ---------------------------------------------------------------- extraction
class _CappedReads:
    """The decompressed stream tarfile reads. tarfile reads a PAX or GNU long-name header's whole declared
    size at once, into memory: a few KB of gzip could otherwise ask for gigabytes before any check runs."""

    def __init__(self, raw):
        self.raw = raw

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_READ:
            raise BundleError(f"an archive header declares {size} bytes of metadata (over {_MAX_READ})")
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _member_problem(
    member: tarfile.TarInfo, files: dict[str, int], folders: set[str], seen: set[str]
) -> str | None:
    """Why `member` (after the manifest) must not be extracted, or None. `seen`: the names before it,
    case-folded (names equal but for case are one file on macOS and Windows)."""
    why = path_problem(member.name)
    if why is not None:
        return why
    if member.name.casefold() in seen:
        return "a second member with this name (it would overwrite the first)"
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        return f"a {kind} link (to {member.linkname!r}); bundles hold no links"
    if member.isdir():
        return None if member.name in folders else "a folder that holds no file of the manifest"
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = "a device" if member.isdev() and not member.isfifo() else "a FIFO" if member.isfifo() else None
        return f"{kind or f'a member of type {member.type!r}'}, not a regular file or folder"
    if member.name not in files:
        return "not listed in the manifest"
    if member.size != files[member.name]:
        return f"{member.size} bytes, which differs from the manifest's {files[member.name]}"
    return None


def _filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's `data` filter (confined paths, no special files, no setuid), then our modes: 0755 for
    executables, 0644 for other files (what the writer stores)."""
    member = tarfile.data_filter(member, path)
    if member.isfile():
        member = member.replace(mode=0o755 if member.mode & 0o100 else 0o644, deep=False)
    return member


def _open_tar(raw):
    """A tarfile over `raw` (.tar.gz, or a plain .tar) whose single reads are capped."""
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if raw.read(2) == b"\x1f\x8b" else raw
    raw.seek(0)
    tar = tarfile.open(fileobj=_CappedReads(stream), mode="r:")
    tar.errorlevel = 2  # every extraction error raises: nothing is skipped silently
    return tar


def _check_destination(dest: Path) -> None:
    """`dest` must not exist, or be an empty folder (not a link): extraction never overwrites anything."""
    fix = "extract into a new folder (or an empty one); nothing that exists is overwritten."
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        if not dest.parent.is_dir():
            raise BundleError(
                f"the folder {dest.parent} does not exist", fix=f"create it first; {fix}"
            ) from None
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"{dest} exists and is a link or a file, not a folder", fix=fix)
    with os.scandir(dest) as entries:
        if any(True for _ in entries):
            raise BundleError(f"{dest} is not empty", fix=fix)


def _read_first_manifest(tar: tarfile.TarFile, limits: Limits) -> tuple[tarfile.TarInfo, dict[str, int]]:
    """The archive's first member, which must be manifest.json, and its checked files ({path: bytes})."""
    first = tar.next()
    if first is None or first.name != MANIFEST or first.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise BundleError(
            "manifest.json must be the archive's first member, a regular file",
            file=first.name if first else None,
            fix="make the bundle again with `qwen3-compile bundle` (bundles made before the manifest went "
            "first are refused; `tar -xzf` and `runner.py check` still read them).",
        )
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"larger than {MAX_MANIFEST_BYTES} bytes", file=MANIFEST)
    return first, check_manifest(_parse_manifest(tar.extractfile(first).read()), limits)


def _lock(folder: Path) -> int:
    """An exclusive flock on `folder` (its descriptor; closing it releases the lock). The kernel drops it when
    the holder dies, however it dies, so an unlocked partial folder is a killed run's leftover."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_stale_partials(dest: Path) -> None:
    """Remove the `.DEST.partial-*` folders killed extractions into `dest` left (none a live one holds)."""
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.partial-*"):
        if stale.is_symlink() or not stale.is_dir():
            continue
        try:
            fd = _lock(stale)
        except OSError:
            continue  # a live extraction's folder
        try:
            shutil.rmtree(stale, ignore_errors=True)
        finally:
            os.close(fd)


def safe_extract(archive: str | Path, dest: str | Path, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Extract the bundle `archive` into `dest` (absent, or an empty folder) and check every file's sha256;
    returns the extracted file names (POSIX, relative to `dest`). Raises BundleError on anything unsafe,
    leaving nothing behind (see the module's docstring)."""
    if not hasattr(tarfile, "data_filter"):
        raise BundleError(
            f"this Python ({sys.version.split()[0]}) has no tarfile extraction filters (PEP 706)",
            fix="use Python 3.10.12+, 3.11.4+ or 3.12+ (on JetPack 6: apt upgrade python3.10).",
        )
    dest = Path(dest)
    _check_destination(dest)
    names = [MANIFEST]
    try:
        with open(archive, "rb") as raw, _open_tar(raw) as tar:
            first, files = _read_first_manifest(tar, limits)
            need, free = sum(files.values()) + first.size, shutil.disk_usage(dest.parent).free
            if need > free:
                raise BundleError(
                    f"the bundle needs {need / GiB:.1f} GiB; {dest.parent} has {free / GiB:.1f} GiB free",
                    fix="free some space or extract elsewhere (verify-bundle extracts into $TMPDIR).",
                )
            folders = {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
            seen = {MANIFEST}
            remove_stale_partials(dest)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
            lock = _lock(tmp)  # held until the folder is renamed or removed
            try:
                tar.extract(first, tmp, filter=_filter)
                for member in iter(tar.next, None):  # checked from its header, before its data is read
                    why = _member_problem(member, files, folders, seen)
                    if why is not None:
                        raise BundleError(f"refused to extract: {why}", file=member.name)
                    seen.add(member.name.casefold())
                    tar.extract(member, tmp, filter=_filter)
                    if member.isfile():
                        names.append(member.name)
                check_files(tmp, device_outputs=False, limits=limits)
                os.chmod(tmp, 0o755)
                os.rename(tmp, dest)  # atomic; replaces an empty folder
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                os.close(lock)
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as err:
        raise BundleError(f"cannot read or extract the archive ({err})") from None
    return names


# ---------------------------------------------------------------- checks of an extracted folder
def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_files(folder: str | Path) -> set[str]:
    """Every regular file under `folder` (POSIX, relative). Raises BundleError at the first link, hard
    link or special file: nothing is followed (lstat), so a link cannot redirect a later read or write."""
    found, todo = set(), [""]
    while todo:
        prefix = todo.pop()
        with os.scandir(Path(folder) / prefix) as entries:
            for entry in entries:
                name = prefix + entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    todo.append(name + "/")
                elif not stat.S_ISREG(st.st_mode):
                    kind = (
                        "a symbolic link"
                        if stat.S_ISLNK(st.st_mode)
                        else "a special file (FIFO, device, socket)"
                    )
                    problem = f"{kind}; bundles hold regular files and folders only"
                    raise BundleError(problem, file=name, fix=FIX_FOLDER)
                elif st.st_nlink > 1:  # a hard link: writing it would write the other name's file too
                    raise BundleError("a hard link (the file has another name)", file=name, fix=FIX_FOLDER)
                else:
                    found.add(name)
    return found


def check_files(folder: str | Path, device_outputs: bool = True, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Every file the manifest lists exists with its sha256 and size; no file is unlisted; no link or
    special file anywhere. Returns the manifest; raises BundleError naming the first bad file.
    `device_outputs`: allow build/ and engine/ (what the device writes after extraction); a fresh archive
    must not carry them (a prebuilt plugin library there would be loaded by the runner without any
    checksum)."""
    folder = Path(folder)
    present = tree_files(folder)
    manifest = read_manifest(folder)
    sizes = check_manifest(manifest, limits)
    for name in sorted(sizes):
        if name not in present:
            raise BundleError("listed in the manifest but missing", name, _FIX_CHANGED, exit_code=1)
        path = folder / name
        if path.stat().st_size != sizes[name] or sha256_file(path) != manifest["files"][name]["sha256"]:
            raise BundleError(
                "sha256 differs from the manifest (the file was changed)", name, _FIX_CHANGED, 1
            )
    unlisted = present - set(sizes) - {MANIFEST}
    extra = sorted(e for e in unlisted if not (device_outputs and e.startswith(DEVICE_OUTPUTS)))
    if extra:
        raise BundleError("not listed in the manifest (an added file)", extra[0], _FIX_CHANGED, exit_code=1)
    return manifest


# ---------------------------------------------------------------- the device against the target
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
