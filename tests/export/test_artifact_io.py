"""Artifact folders are replaced whole: the finished folder is renamed into place, an existing one is
moved aside first and removed after; a failed build leaves the previous folder untouched."""

from __future__ import annotations

import pytest

from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.artifact_dir import atomic_output_dir, copy_side_files, replace_dir


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


def test_replace_dir_puts_the_new_folder_in_place_and_leaves_nothing_beside_it(tmp_path):
    new, dest = tmp_path / ".out.partial", tmp_path / "out"
    new.mkdir()
    (new / "model.onnx").write_text("new")
    replace_dir(new, dest)  # nothing there yet
    assert _tree(dest) == {"model.onnx": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    again = tmp_path / ".out.partial-2"
    (again / "sub").mkdir(parents=True)
    (again / "sub" / "a.txt").write_text("newer")
    replace_dir(again, dest)  # an existing folder is replaced, its old files gone
    assert _tree(dest) == {"sub/a.txt": "newer"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "model.onnx").write_text("first")
    with pytest.raises(BadInputError):
        with atomic_output_dir(out, force=False):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "model.onnx").write_text("half")
            raise RuntimeError("interrupted")
    assert _tree(out) == {"model.onnx": "first"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "model.onnx").write_text("second")
    assert _tree(out) == {"model.onnx": "second"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_copy_side_files_skips_by_name_prefix_and_leaves_folders(tmp_path):
    src, dst = tmp_path / "artifact", tmp_path / "out"
    (src / "validation").mkdir(parents=True)
    (src / "validation" / "report.json").write_text("{}")
    names = ["model.onnx", "model.onnx.data", "manifest.json", "calibration.safetensors", "config.json"]
    for name in [*names, "tokenizer.json"]:
        (src / name).write_text(name)
    dst.mkdir()
    copied = copy_side_files(src, dst, skip=("model.onnx", "manifest.json", "calibration.safetensors"))
    assert copied == ["config.json", "tokenizer.json"]
    assert _tree(dst) == {"config.json": "config.json", "tokenizer.json": "tokenizer.json"}
    again = tmp_path / "again"
    again.mkdir()
    assert copy_side_files(src, again, skip=("model.onnx", "manifest.json")) == [
        "calibration.safetensors",
        "config.json",
        "tokenizer.json",
    ]
