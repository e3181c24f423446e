"""Extraction refuses absolute paths, `..` and links escaping the folder (in verify-bundle and in the
runner's `unpack`), before writing anything; a changed, missing or added file fails verification by name."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen3_compile.bundle.archive import write_reproducible_tar
from qwen3_compile.bundle.device.bundle_files import BundleError, check_files, safe_extract
from qwen3_compile.bundle.verify import verify_bundle
from qwen3_compile.cli import main
from qwen3_compile.errors import CheckFailedError

RUNNER = Path(__file__).parents[2] / "qwen3_compile" / "bundle" / "device" / "runner.py"


def make_tar(path: Path, members: list[tuple[str, str, str]]) -> Path:
    """members: (name, kind, data-or-link-target) with kind 'file', 'symlink' or 'hardlink'."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload.encode()))
                continue
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = payload
            tar.addfile(info)
    return path


UNSAFE = {
    "absolute": ([("/tmp/evil.txt", "file", "x")], "/tmp/evil.txt", "absolute path"),
    "dotdot": ([("model/../../evil.txt", "file", "x")], "model/../../evil.txt", "'..' in the path"),
    "symlink-up": ([("model/link", "symlink", "../../outside")], "model/link", "link escaping the folder"),
    "symlink-abs": ([("link", "symlink", "/etc/passwd")], "link", "link to an absolute path"),
    "hardlink-up": ([("link", "hardlink", "../outside")], "link", "link escaping the folder"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_members_are_refused_before_anything_is_written(case, tmp_path):
    members, name, why = UNSAFE[case]
    archive = make_tar(tmp_path / "bad.tar.gz", [("README.md", "file", "ok"), *members])
    dest = tmp_path / "out"
    with pytest.raises(BundleError) as err:
        safe_extract(archive, dest)
    assert err.value.file == name and why in err.value.problem
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()
    with pytest.raises(CheckFailedError) as err:
        verify_bundle(archive)
    assert name in err.value.message and why in err.value.message
    run = subprocess.run(
        [sys.executable, str(RUNNER), "unpack", str(archive), str(dest)], capture_output=True, text=True
    )
    assert run.returncode == 1 and name in run.stderr and why in run.stderr
    assert not dest.exists()


def test_links_inside_the_folder_are_extracted(tmp_path):
    archive = make_tar(
        tmp_path / "ok.tar.gz",
        [
            ("model/a.txt", "file", "hello"),
            ("model/b.txt", "symlink", "a.txt"),
            ("c.txt", "symlink", "model/a.txt"),
        ],
    )
    names = safe_extract(archive, tmp_path / "out")
    assert names == ["model/a.txt"] and (tmp_path / "out" / "c.txt").read_text() == "hello"


def test_a_changed_added_or_missing_file_fails_verification_by_name(bundled, tmp_path):
    folder = tmp_path / "b"
    safe_extract(bundled.archive, folder)
    pristine = json.loads((folder / "manifest.json").read_text())

    tampered = folder / "model" / "tokenizer_config.json"
    original = tampered.read_bytes()
    tampered.write_bytes(original.replace(b"<|im_start|>", b"<|im_start|>evil", 1))
    repacked = write_and_verify_fails(folder, tmp_path, "model/tokenizer_config.json", repack=True)
    result = CliRunner().invoke(main, ["verify-bundle", str(repacked)])
    assert result.exit_code == 1 and "model/tokenizer_config.json: sha256 differs" in result.output
    run = subprocess.run([sys.executable, str(folder / "runner.py"), "check"], capture_output=True, text=True)
    assert run.returncode == 1 and "model/tokenizer_config.json" in run.stderr
    tampered.write_bytes(original)
    assert check_files(folder) == pristine

    (folder / "extra.py").write_text("print('not from the bundle')\n")
    write_and_verify_fails(folder, tmp_path, "extra.py")
    (folder / "extra.py").unlink()

    # what the device builds (build/, engine/) is allowed beside an extracted bundle, never inside an archive:
    # the runner would load a prebuilt plugin library that no checksum covers
    prebuilt = folder / "build" / "plugin" / "libqmoe_trt_plugin.so"
    prebuilt.parent.mkdir(parents=True)
    prebuilt.write_bytes(b"\x7fELF not ours")
    assert verify_bundle(folder).files == len(pristine["files"])
    archive = tmp_path / "prebuilt.tar.gz"
    write_reproducible_tar(folder, archive)
    with pytest.raises(CheckFailedError) as err:
        verify_bundle(archive)
    assert err.value.field == "build/plugin/libqmoe_trt_plugin.so"
    unpack = [sys.executable, str(RUNNER), "unpack", str(archive), str(tmp_path / "unpacked")]
    run = subprocess.run(unpack, capture_output=True, text=True)
    assert run.returncode == 1 and "build/plugin/libqmoe_trt_plugin.so: not listed" in run.stderr
    shutil.rmtree(folder / "build")
    shutil.move(folder / "runner.py", tmp_path / "runner.py")
    write_and_verify_fails(folder, tmp_path, "runner.py")


def write_and_verify_fails(folder: Path, tmp_path: Path, name: str, repack: bool = False) -> Path | None:
    """Verification of the folder (and, repacked, of a .tar.gz of it) fails naming `name`."""
    with pytest.raises(CheckFailedError) as err:
        verify_bundle(folder)
    assert err.value.field == name, err.value.message
    if not repack:
        return None
    archive = tmp_path / "repacked.tar.gz"
    write_reproducible_tar(folder, archive)
    with pytest.raises(CheckFailedError) as err:
        verify_bundle(archive)
    assert err.value.field == name and name in err.value.message
    return archive


def test_incompatible_device_is_named(bundled):
    with pytest.raises(CheckFailedError) as err:
        verify_bundle(bundled.archive, trt_version="10.2.0", sm="8.7")
    assert "TensorRT 10.2.0 is older than jetson-agx-orin's minimum 10.3" in err.value.message
    with pytest.raises(CheckFailedError, match=r"SM 11.0 is not jetson-agx-orin's SM 8.7"):
        verify_bundle(bundled.archive, trt_version="10.13", sm="11.0")
    assert verify_bundle(bundled.archive, trt_version="10.3.0.30", sm="8.7").files == len(
        bundled.manifest["files"]
    )
