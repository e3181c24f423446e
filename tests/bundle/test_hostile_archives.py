"""Hostile archives are refused by `verify-bundle` and the runner's `unpack` (the same bundle_files.py) before
anything is written: links of any kind, special files, absolute or `..` names, duplicates, members the
manifest does not list, a manifest that is not the first member, sizes over the limits. Each refusal: exit
code 2, one message naming the archive, the member and the fix, no traceback, nothing left in the
destination, nothing written outside it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .hostile import (
    RUNNER,
    Entry,
    assert_clean_refusal,
    records,
    run_device,
    tree,
    verify_cli,
    write_archive,
    write_bomb,
)

GOOD = {"README.md": b"ok\n", "model/config.json": b"{}"}
GOOD_ENTRIES = [
    Entry("README.md", data=GOOD["README.md"]),
    Entry("model", "dir"),
    Entry("model/config.json", data=b"{}"),
]
MANIFEST = {"format": 1, "files": records(GOOD)}

# name: (members after the good ones, what the message names, why)
HOSTILE = {
    "symlink-escape": ([Entry("model/link", "symlink", link="../../outside")], "model/link", "symbolic link"),
    "symlink-absolute": ([Entry("link", "symlink", link="/etc/passwd")], "link", "symbolic link"),
    "symlink-then-write-through": (
        [
            Entry("build", "symlink", link="."),
            Entry("build/engine", "symlink", link="../outside"),
            Entry("engine/model.plan", data=b"plan"),
        ],
        "build",
        "symbolic link",
    ),
    "hardlink-etc-passwd": ([Entry("passwd", "hardlink", link="/etc/passwd")], "passwd", "hard link"),
    "hardlink-through-symlink": (
        [
            Entry("loop", "symlink", link="."),
            Entry("loop/up", "symlink", link=".."),
            Entry("stolen", "hardlink", link="up/../outside/secret.txt"),
        ],
        "loop",
        "symbolic link",
    ),
    "absolute": ([Entry("{outside}/evil.txt", data=b"x")], "/evil.txt", "absolute path"),
    "dotdot": ([Entry("model/../../outside/evil.txt", data=b"x")], "model/../../outside/evil.txt", "'..'"),
    "fifo": ([Entry("model/pipe", "fifo")], "model/pipe", "FIFO"),
    "device": ([Entry("null", "chardev")], "null", "device"),
    "duplicate": ([Entry("README.md", data=b"no\n")], "README.md", "second member"),
    "duplicate-by-case": ([Entry("readme.md", data=b"no\n")], "readme.md", "second member"),
    "unlisted": ([Entry("extra.py", data=b"print('not from the bundle')\n")], "extra.py", "not listed"),
    "size-differs": ([], "README.md", "differs from the manifest"),
}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """tmp_path/sandbox: the destination's folder and every temporary folder; tmp_path/outside: a secret
    file and a folder that links aim at."""
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sandbox"))
    return tmp_path / "sandbox"


def assert_archive_refused(archive: Path, sandbox: Path, *names: str, options: tuple = ()) -> None:
    root = sandbox.parent
    before = tree(root)
    result = verify_cli(archive, *options)
    assert_clean_refusal(result.output, result.exit_code, str(archive), *names)
    assert tree(root) == before  # verify-bundle's temporary folder is gone and wrote nothing anywhere
    dest = sandbox / "out"
    run = run_device(RUNNER, "unpack", str(archive), str(dest), *options, tmpdir=sandbox)
    assert_clean_refusal(run.stderr, run.returncode, str(archive), *names)
    assert not dest.exists() and tree(root) == before  # no partial folder, nothing outside


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_and_nothing_is_written(case, sandbox):
    extra, name, why = HOSTILE[case]
    outside = sandbox.parent / "outside"
    extra = [Entry(e.name.format(outside=outside), e.kind, e.data, e.link) for e in extra]
    manifest = MANIFEST
    if case == "size-differs":
        manifest = {
            "format": 1,
            "files": {**records(GOOD), "README.md": {**records(GOOD)["README.md"], "bytes": 2}},
        }
    archive = write_archive(sandbox.parent / "bad.tar.gz", [*GOOD_ENTRIES, *extra], manifest)
    assert_archive_refused(archive, sandbox, name, why)


def test_a_manifest_that_is_not_the_first_member_is_refused(sandbox):
    """Read first, so that every member is checked against it as its header is read; a bundle written before
    the manifest went first is named as such."""
    archive = sandbox.parent / "late.tar.gz"
    write_archive(archive, [*GOOD_ENTRIES, Entry("manifest.json", data=json.dumps(MANIFEST).encode())])
    assert_archive_refused(archive, sandbox, "README.md", "manifest.json must be the archive's first member")
    assert_archive_refused(write_archive(archive, GOOD_ENTRIES), sandbox, "manifest.json must be")


@pytest.mark.parametrize("listed", ["/etc/passwd", "../outside/secret.txt", "model\\..\\x", "./README.md"])
def test_manifest_paths_outside_the_bundle_are_refused(listed, sandbox):
    target = Path("/etc/passwd") if listed == "/etc/passwd" else sandbox.parent / "outside" / "secret.txt"
    data = target.read_bytes()
    manifest = {"format": 1, "files": {**records(GOOD), listed: records({listed: data})[listed]}}
    archive = write_archive(sandbox.parent / "listed.tar.gz", GOOD_ENTRIES, manifest)
    assert_archive_refused(archive, sandbox, "manifest.json", listed.replace("\\", "\\\\"))


GIB = 1 << 30


@pytest.mark.parametrize(
    "case", ["unlisted", "size-differs", "over-file-limit", "over-total-limit", "manifest-last", "pax-header"]
)
def test_a_2mb_archive_declaring_2gb_is_refused_before_writing(case, sandbox):
    """The reported bomb: 2 MB of gzip that expands to 2 GiB. Refused from the manifest and the member's
    header alone: no byte of it is written (the sandbox stays empty) and no time is spent expanding it."""
    bomb = "model/model.onnx.data"
    listed = {bomb: {"sha256": "0" * 64, "bytes": 2 * GIB}}
    manifest = {
        "unlisted": MANIFEST,
        "size-differs": {"format": 1, "files": {**records(GOOD), bomb: {"sha256": "0" * 64, "bytes": 7}}},
        "over-file-limit": {"format": 1, "files": {**records(GOOD), **listed}},
        "over-total-limit": {"format": 1, "files": {**records(GOOD), **listed}},
        "manifest-last": None,
        "pax-header": MANIFEST,
    }[case]
    options = {"over-file-limit": ("--max-file-size", "1G"), "over-total-limit": ("--max-total-size", "2G")}
    archive = write_bomb(
        sandbox.parent / "bomb.tar.gz", 2 * GIB, GOOD_ENTRIES, manifest, case == "pax-header"
    )
    assert archive.stat().st_size < 4 << 20
    why = {
        "unlisted": "not listed in the manifest",
        "size-differs": "differs from the manifest",
        "over-file-limit": "over the per-file limit",
        "over-total-limit": "over the limit",
        "manifest-last": "manifest.json must be the archive's first member",
        "pax-header": "bytes of metadata",
    }[case]
    start = time.perf_counter()
    assert_archive_refused(archive, sandbox, why, options=options.get(case, ()))
    assert time.perf_counter() - start < 20  # two refusals, the runner's in a new interpreter


def test_too_many_files_are_refused_from_the_manifest(sandbox):
    many = {f"model/part{i:05d}.bin": b"" for i in range(10_001)}
    entries = [Entry(name) for name in many]
    archive = write_archive(sandbox.parent / "many.tar.gz", entries, {"format": 1, "files": records(many)})
    assert_archive_refused(archive, sandbox, "manifest.json", "10001 files", "--max-files")


def test_limits_are_flags(sandbox):
    """The same archive passes or is refused by the runner's flags (what a very large bundle would use)."""
    archive = write_archive(sandbox.parent / "ok.tar.gz", GOOD_ENTRIES, MANIFEST)
    assert_archive_refused(archive, sandbox, "--max-files", options=("--max-files", "1"))
    assert_archive_refused(archive, sandbox, "README.md", options=("--max-file-size", "2"))
    run = run_device(RUNNER, "unpack", str(archive), str(sandbox / "out"), "--max-files", "2")
    assert run.returncode == 0, run.stderr
    assert tree(sandbox / "out").keys() == {"README.md", "model", "model/config.json", "manifest.json"}


def test_extraction_needs_a_new_or_empty_destination(sandbox):
    archive = write_archive(sandbox.parent / "ok.tar.gz", GOOD_ENTRIES, MANIFEST)
    dest = sandbox / "out"
    dest.mkdir()
    run = run_device(RUNNER, "unpack", str(archive), str(dest))  # empty: filled
    assert run.returncode == 0, run.stderr
    assert (dest / "README.md").read_bytes() == GOOD["README.md"]
    before = tree(sandbox)
    run = run_device(RUNNER, "unpack", str(archive), str(dest))  # not empty: refused, untouched
    assert_clean_refusal(run.stderr, run.returncode, str(dest), "not empty")
    assert tree(sandbox) == before
    link = sandbox / "link"
    link.symlink_to(sandbox.parent / "outside")
    run = run_device(RUNNER, "unpack", str(archive), str(link))
    assert_clean_refusal(run.stderr, run.returncode, str(link), "link")
    assert tree(sandbox.parent / "outside").keys() == {"secret.txt"}


def test_an_incomplete_archive_leaves_nothing(sandbox):
    archive = write_archive(sandbox.parent / "ok.tar.gz", GOOD_ENTRIES, MANIFEST)
    cut = sandbox.parent / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:-30])
    before = tree(sandbox.parent)
    run = run_device(RUNNER, "unpack", str(cut), str(sandbox / "out"), tmpdir=sandbox)
    assert_clean_refusal(run.stderr, run.returncode, str(cut))
    assert tree(sandbox.parent) == before
    garbage = sandbox.parent / "garbage.tar.gz"
    garbage.write_bytes(hashlib.sha256(b"x").digest() * 100)
    assert_archive_refused(garbage, sandbox, "cannot read")


def test_verify_bundle_json_prints_an_error_object(sandbox):
    archive = write_archive(
        sandbox.parent / "bad.tar.gz", [*GOOD_ENTRIES, Entry("x", "symlink", link="/")], MANIFEST
    )
    result = verify_cli(archive, "--json")
    assert result.exit_code == 2 and "Traceback" not in result.output
    data = json.loads(result.stdout)
    assert data["exit_code"] == 2 and data["file"] == str(archive) and data["field"] == "x"
    assert "symbolic link" in data["error"] and "qwen3-compile bundle" in data["fix"]


def test_a_python_without_extraction_filters_is_refused(sandbox, monkeypatch):
    """JetPack 6's Python 3.10 has tarfile's filters from 3.10.12 on: older ones are refused, not bypassed."""
    import tarfile

    from qwen3_compile.bundle.device.bundle_files import BundleError, safe_extract

    archive = write_archive(sandbox.parent / "ok.tar.gz", GOOD_ENTRIES, MANIFEST)
    monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(BundleError, match="PEP 706") as err:
        safe_extract(archive, sandbox / "out")
    assert "3.10.12" in err.value.fix and tree(sandbox) == {}


def test_a_killed_unpack_leaves_a_partial_folder_the_next_unpack_removes(sandbox):
    """SIGKILL mid-extraction leaves `.out.partial-*`; the next unpack into `out` removes it, but never the
    partial folder of an extraction that is still running (it holds a lock on its folder)."""
    archive = write_archive(sandbox.parent / "ok.tar.gz", GOOD_ENTRIES, MANIFEST)
    dead = sandbox / ".out.partial-killed"
    (dead / "model").mkdir(parents=True)
    (dead / "model" / "half.bin").write_bytes(b"\0" * 1000)
    live = sandbox / ".out.partial-running"
    live.mkdir()
    holder = subprocess.Popen(  # another extraction, alive: it holds the flock on its folder
        [sys.executable, "-c", HOLD_LOCK, str(live)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        run = run_device(RUNNER, "unpack", str(archive), str(sandbox / "out"), tmpdir=sandbox)
        assert run.returncode == 0, run.stderr
        assert not dead.exists() and live.is_dir()
        assert sorted(p.name for p in sandbox.iterdir()) == [".out.partial-running", "out"]
    finally:
        holder.kill()
        holder.wait()


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""
