"""Typed manifests: every artifact kind round-trips through the strict decoder, and a hostile manifest is
refused with exit 2 naming the file and the field."""

from __future__ import annotations

import json
import math

import pytest

from qwen3_compile.errors import BadInputError
from qwen3_compile.schema import decode, encode
from qwen3_compile.storage.manifest import read_manifest
from qwen3_compile.storage.manifests import ARTIFACT_KINDS


@pytest.fixture(scope="module")
def written(artifacts, tmp_path_factory):
    """One folder per artifact kind the CPU machine can make: export, quantize (the shared ones), lower."""
    from qwen3_compile.lower.stage import lower_artifact

    export = artifacts.exported("tiny-moe")
    quantized = artifacts.quantized_artifact("tiny-moe", "int8-wo")
    lowered = lower_artifact(quantized.directory, tmp_path_factory.mktemp("manifests") / "lower", "ort")
    return {"export": export, "quantize": quantized, "lower": lowered}


@pytest.mark.parametrize("kind", ["export", "quantize", "lower"])
def test_round_trip(written, kind):
    artifact = written[kind]
    on_disk = json.loads((artifact.directory / "manifest.json").read_text())
    assert on_disk["stage"] == kind
    typed = read_manifest(artifact.directory)
    assert type(typed) is ARTIFACT_KINDS[kind]
    assert typed == artifact.manifest  # what the stage returned is what a later stage reads
    assert encode(typed) == on_disk  # and the file holds exactly the typed fields
    assert decode(type(typed), encode(typed)) == typed


def _broken(written, tmp_path, kind, change):
    """A copy of the kind's manifest with `change(data)` applied, in a folder of its own."""
    folder = tmp_path / kind
    folder.mkdir()
    data = json.loads((written[kind].directory / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    "kind, change, field",
    [
        ("export", lambda d: d.update(surprise=1), "surprise"),
        ("export", lambda d: d["options"].update(dtype="fp64"), "options.dtype"),
        ("export", lambda d: d["options"].update(opset="21"), "options.opset"),
        ("export", lambda d: d["options"].update(max_positions=True), "options.max_positions"),
        ("export", lambda d: d["options"].update(max_positions=-4), "options.max_positions"),
        ("export", lambda d: d.pop("architecture"), "architecture"),
        ("quantize", lambda d: d["quantization"].update(float_bytes=math.nan), "quantization.float_bytes"),
        ("quantize", lambda d: d["recipe"]["gates"].update(max_mean_kl=math.inf), "recipe.gates.max_mean_kl"),
        ("quantize", lambda d: d.update(ort_optimization="extreme"), "ort_optimization"),
        ("quantize", lambda d: d.update(warnings="none"), "warnings"),
        ("lower", lambda d: d["lowering"].update(runtime="tvm"), "lowering.runtime"),
        ("lower", lambda d: d["outputs"]["model.onnx"].update(bytes=-1), "outputs.model.onnx.bytes"),
        ("lower", lambda d: d.update(stage="validate"), "stage"),
    ],
)
def test_hostile_manifest_is_refused_naming_the_field(written, tmp_path, kind, change, field):
    folder = _broken(written, tmp_path, kind, change)
    with pytest.raises(BadInputError) as info:
        read_manifest(folder)
    assert info.value.exit_code == 2
    assert info.value.field == field, info.value.message
    assert str(folder / "manifest.json") in info.value.message


def test_non_json_and_missing_manifests(tmp_path):
    with pytest.raises(BadInputError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BadInputError) as info:
        read_manifest(tmp_path)
    assert info.value.field == "stage"


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.onnx"])
def test_any_listed_file_changed_in_place_is_refused(artifacts, artifact_copy, tmp_path, name):
    """One byte changed, size kept: every stage reading the artifact refuses it, naming the file."""
    from click.testing import CliRunner

    from qwen3_compile.cli import main

    folder = artifact_copy(artifacts.export("tiny-dense"))
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for args in (
        ["quantize", folder, "--recipe", "int8-wo", "-o", tmp_path / "q"],
        ["lower", folder, "--for", "ort", "-o", tmp_path / "l"],
        ["validate", folder, "--reference", "tiny-dense", "-o", tmp_path / "v"],
    ):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 2 and name in result.output and "manifest" in result.output, result.output
    assert not any((tmp_path / d).exists() for d in ("q", "l", "v"))
