"""Typed manifests: every artifact kind round-trips through the strict decoder, and a hostile manifest is
refused with exit 2 naming the file and the field."""

from __future__ import annotations

import json
import math

import pytest

from qwen3_compile.errors import BadInputError
from qwen3_compile.export.stage import ExportedArtifact, export_onnx
from qwen3_compile.lower.stage import LoweredArtifact, lower_artifact
from qwen3_compile.quantize.stage import QuantizedArtifact, quantize_artifact
from qwen3_compile.schema import decode, encode
from qwen3_compile.storage.manifest import read_manifest
from qwen3_compile.storage.manifests import ARTIFACT_KINDS

RESULTS = {"export": ExportedArtifact, "quantize": QuantizedArtifact, "lower": LoweredArtifact}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One folder per artifact kind the CPU machine can make (export, quantize, lower), with the result each
    stage returned: made here, not shared (`artifacts` reads the shared ones back with `from_folder`)."""
    out = tmp_path_factory.mktemp("manifests")
    export = export_onnx("tiny-moe", out / "export")
    quantized = quantize_artifact(export.directory, "int8-wo", out / "quantize")
    lowered = lower_artifact(quantized.directory, out / "lower", "ort")
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
    assert RESULTS[kind].from_folder(artifact.directory) == artifact  # the whole result, from the folder


def test_quantized_tensors_recorded(written):
    """The manifest lists every quantized weight; `quantization` holds their totals. tiny-moe (2 layers)
    under int8-wo: q/k/v/o and the experts' stacked gate_up and down per layer (the router, embeddings and
    head stay float)."""
    manifest = written["quantize"].manifest
    names = [t.name for t in manifest.tensors]
    assert len(names) == manifest.quantization.quantized_tensors == 2 * 6
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.self_attn.q_proj.weight"} <= set(names)
    assert not any(".mlp.gate." in n or n.startswith(("lm_head", "model.embed")) for n in names)
    assert sum(t.float_bytes for t in manifest.tensors) == manifest.quantization.float_bytes
    assert sum(t.quantized_bytes for t in manifest.tensors) == manifest.quantization.quantized_bytes
    down = next(t for t in manifest.tensors if t.name == "model.layers.0.mlp.experts.down_proj")
    assert down.shape == (16, 64, 32)  # [experts, out (hidden), in (moe_intermediate_size)]
    # fp32 weights -> int8 values plus one fp32 scale per expert and output channel
    assert down.float_bytes == 4 * 16 * 64 * 32 and down.quantized_bytes == 16 * 64 * 32 + 4 * 16 * 64


@pytest.mark.parametrize("kind, other", [("export", "quantize"), ("quantize", "lower"), ("lower", "export")])
def test_from_folder_refuses_another_kind(written, kind, other):
    with pytest.raises(BadInputError) as info:
        RESULTS[kind].from_folder(written[other].directory)
    assert info.value.field == "stage" and f"this one was written by `{other}`" in info.value.problem


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
