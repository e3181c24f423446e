"""Output folders: the same --force rule everywhere (validate and bundle included), leftovers of killed runs
removed by the next run of the same output, never while a live run holds them."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from qwen3_compile.cli import main
from qwen3_compile.storage.artifact_dir import atomic_output_dir, remove_stale_partials


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_killed_run_leftovers_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, sys; from pathlib import Path; from qwen3_compile.storage.artifact_dir import "
        "atomic_output_dir\nwith atomic_output_dir(Path(sys.argv[1]), False) as tmp:\n"
        "    (tmp / 'model.onnx').write_bytes(b'x' * 1000); print(tmp, flush=True); os.kill(os.getpid(), 9)"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert killed.returncode == -9
    leftover = tmp_path / killed.stdout.strip().rsplit("/", 1)[-1]
    assert leftover.is_dir() and leftover.name.startswith(".out.partial-")
    unrelated = tmp_path / ".other.partial-abc"  # another output's: not ours to remove
    unrelated.mkdir()
    with atomic_output_dir(out, False) as tmp:
        assert not leftover.exists()
        (tmp / "model.onnx").write_bytes(b"y")
    assert (out / "model.onnx").read_bytes() == b"y" and unrelated.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-abc", "out"]


def test_a_running_writer_keeps_its_partial_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out, False) as theirs:  # a concurrent run, mid-way
        (theirs / "model.onnx").write_bytes(b"theirs")
        # another process cleans up before its own run of the same output (flock is per open file)
        code = (
            "import sys; from pathlib import Path\n"
            "from qwen3_compile.storage.artifact_dir import remove_stale_partials\n"
            "remove_stale_partials(Path(sys.argv[1]))"
        )
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
        assert (theirs / "model.onnx").read_bytes() == b"theirs"
    assert (out / "model.onnx").read_bytes() == b"theirs"


def test_a_linked_leftover_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    (tmp_path / ".out.partial-link").symlink_to(elsewhere)
    remove_stale_partials(tmp_path / "out")
    assert (elsewhere / "precious").read_text() == "x"


def test_validate_refuses_an_existing_folder_without_force(artifacts, tmp_path):
    exported = artifacts.export("tiny-dense")
    existing = tmp_path / "report"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    result = _invoke(["validate", exported, "--reference", "tiny-dense", "-o", existing, "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout)["field"] == "--output"
    assert (existing / "mine.txt").read_text() == "keep me"
    for inside in (exported, exported / "sub", exported.parent):  # over, inside or around the artifact
        result = _invoke(["validate", exported, "--reference", "tiny-dense", "-o", inside, "--force"])
        assert result.exit_code == 2 and "input" in result.output, result.output


def test_bundle_onto_a_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    result = _invoke(["bundle", artifact, "--target", "jetson-orin-nano", "-o", folder, "--force"])
    assert result.exit_code == 2 and "a bundle is one .tar.gz file" in result.output, result.output
    result = _invoke(["bundle", artifact, "--target", "jetson-orin-nano", "-o", artifact / "b.tar.gz"])
    assert result.exit_code == 2 and "input" in result.output
    assert list(artifact.iterdir()) == []
