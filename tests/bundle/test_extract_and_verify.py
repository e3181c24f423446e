"""A changed, missing or added file fails verification by name (exit 1); what the device builds is allowed
beside an extracted bundle, never inside an archive (refused, exit 2). Hostile archives and folders:
test_hostile_archives.py, test_hostile_folders.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen3_compile.bundle.archive import write_reproducible_tar
from qwen3_compile.bundle.device.bundle_files import check_files, safe_extract
from qwen3_compile.bundle.verify import verify_bundle
from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError, CheckFailedError

RUNNER = Path(__file__).parents[2] / "qwen3_compile" / "bundle" / "device" / "runner.py"


def test_a_changed_added_or_missing_file_fails_verification_by_name(bundled, tmp_path):
    folder = tmp_path / "b"
    safe_extract(bundled.archive, folder)
    pristine = json.loads((folder / "manifest.json").read_text())

    tampered = folder / "model" / "tokenizer_config.json"
    original = tampered.read_bytes()
    tampered.write_bytes(original.replace(b"<|im_start|>", b"<|im_xtart|>", 1))  # same size, other bytes
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
    with pytest.raises(BadInputError) as err:  # refused from its header (build/ is its first member)
        verify_bundle(archive)
    assert err.value.field == "build" and "a folder that holds no file of the manifest" in err.value.problem
    unpack = [sys.executable, str(RUNNER), "unpack", str(archive), str(tmp_path / "unpacked")]
    run = subprocess.run(unpack, capture_output=True, text=True)
    assert run.returncode == 2 and "build: refused to extract: a folder that holds no file" in run.stderr
    assert not (tmp_path / "unpacked").exists()
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
