"""No stage writes into, replaces or deletes one of its inputs: an output folder that is an input, lies inside
one or contains one is refused before any work, and the input is left as it was."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.artifact_dir import check_not_an_input


def test_overlaps_are_refused(tmp_path):
    source = tmp_path / "ckpt"
    source.mkdir()
    for output in (source, source / "onnx", tmp_path):
        with pytest.raises(BadInputError) as info:
            check_not_an_input(output, [source])
        assert info.value.exit_code == 2 and info.value.field == "--output"
    check_not_an_input(tmp_path / "ckpt-onnx", [source])  # a sibling whose name starts the same is fine


def test_export_onto_its_checkpoint_keeps_the_checkpoint(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-dense")
    before = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(ckpt), "--force"])
    assert result.exit_code == 2 and "input" in result.output, result.output
    assert {p.name: p.stat().st_size for p in ckpt.iterdir()} == before
