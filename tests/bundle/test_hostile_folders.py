"""An extracted bundle (by `tar -xzf`, or an old `unpack` that left its folder) is checked without following
links: `verify-bundle DIR` and `runner.py check` refuse links and special files anywhere in it and manifest
paths outside it; `build_engine.py` and `runner.py chat` refuse to start, before they could read or write
through a link."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from qwen3_compile.bundle.archive import safe_extract, write_reproducible_tar

from .device_files import load_device_module
from .hostile import assert_clean_refusal, run_device, tree, verify_cli


@pytest.fixture
def extracted(bundled, tmp_path) -> Path:
    """The real tiny bundle extracted to tmp_path/bundle, beside tmp_path/outside/secret.txt."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret\n")
    folder = tmp_path / "bundle"
    safe_extract(bundled.archive, folder)
    assert verify_cli(folder).exit_code == 0
    return folder


def _engine_link(folder: Path, outside: Path) -> str:
    (folder / "engine").symlink_to(outside, target_is_directory=True)
    return "engine"


def _file_link(folder: Path, outside: Path) -> str:
    """The same bytes as the listed file (its sha256 matches), but through a link."""
    name = "model/tokenizer_config.json"
    shutil.move(folder / name, outside / "tokenizer_config.json")
    (folder / name).symlink_to(outside / "tokenizer_config.json")
    return name


def _plan_hardlink(folder: Path, outside: Path) -> str:
    (folder / "engine").mkdir()
    os.link(outside / "secret.txt", folder / "engine" / "model.plan")
    return "engine/model.plan"


def _fifo(folder: Path, outside: Path) -> str:
    os.mkfifo(folder / "model" / "pipe")
    return "model/pipe"


def _build_link(folder: Path, outside: Path) -> str:
    (folder / "build").symlink_to(folder)  # a loop: walking must not follow it
    return "build"


PLANTED = {
    "engine-symlink": _engine_link,
    "file-symlink": _file_link,
    "plan-hardlink": _plan_hardlink,
    "fifo": _fifo,
    "build-loop": _build_link,
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_links_and_special_files_in_a_folder_are_refused(case, extracted):
    outside = extracted.parent / "outside"
    name = PLANTED[case](extracted, outside)
    before = tree(outside)
    result = verify_cli(extracted)
    assert_clean_refusal(result.output, result.exit_code, name)
    run = run_device(extracted / "runner.py", "check")
    assert_clean_refusal(run.stderr, run.returncode, name)
    # refused before TensorRT is imported (there is none here) and before anything is written
    run = run_device(extracted / "build_engine.py")
    assert_clean_refusal(run.stderr, run.returncode, name)
    run = run_device(
        extracted / "runner.py", "chat", "--backend", "ort", "-p", "Hi"
    )  # writes a scratch graph
    assert_clean_refusal(run.stderr, run.returncode, name)
    assert tree(outside) == before


@pytest.mark.parametrize("listed", ["/etc/passwd", "../outside/secret.txt"])
def test_a_manifest_listing_files_outside_the_bundle_is_refused(listed, extracted, tmp_path):
    """The reported case: listing /etc/passwd with its real sha256 verified with exit 0."""
    target = Path("/etc/passwd") if listed == "/etc/passwd" else tmp_path / "outside" / "secret.txt"
    data = target.read_bytes()
    manifest = json.loads((extracted / "manifest.json").read_text())
    manifest["files"][listed] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (extracted / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    result = verify_cli(extracted)
    assert_clean_refusal(result.output, result.exit_code, "manifest.json", listed)
    run = run_device(extracted / "runner.py", "check")
    assert_clean_refusal(run.stderr, run.returncode, "manifest.json", listed)
    archive = tmp_path / "listed.tar.gz"
    write_reproducible_tar(extracted, archive)
    result = verify_cli(archive)
    assert_clean_refusal(result.output, result.exit_code, str(archive), "manifest.json", listed)


def test_build_engine_writes_the_plan_without_following_links(extracted, tmp_path):
    """build_engine.py's writer: a new file beside the plan, renamed over it; a link at the plan or in its
    folders is refused, a plan already there is replaced (a rebuild)."""
    build_engine = load_device_module(extracted / "build_engine.py", "bundle_build_engine_under_test")
    plan = extracted / "engine" / "model.plan"
    build_engine.write_new_file(extracted, plan, b"first")
    build_engine.write_new_file(extracted, plan, b"second")
    assert plan.read_bytes() == b"second" and tree(extracted / "engine").keys() == {"model.plan"}
    secret = tmp_path / "outside" / "secret.txt"
    plan.unlink()
    plan.symlink_to(secret)
    with pytest.raises(build_engine.BundleError, match="link"):
        build_engine.write_new_file(extracted, plan, b"evil")
    shutil.rmtree(extracted / "engine")
    (extracted / "engine").symlink_to(secret.parent)
    with pytest.raises(build_engine.BundleError, match="link"):
        build_engine.write_new_file(extracted, plan, b"evil")
    assert secret.read_text() == "secret\n" and tree(secret.parent).keys() == {"secret.txt"}
