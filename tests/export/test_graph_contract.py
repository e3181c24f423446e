"""The graph contract: golden signatures, determinism, every expert present, bad options refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from qwen3_compile.errors import BadInputError
from qwen3_compile.export import stage as export_stage
from qwen3_compile.export.stage import ExportOptions, export_onnx

from .signatures import graph_signature

GOLDEN = Path(__file__).resolve().parents[2] / "graphs" / "signatures"
UPDATE = os.environ.get("QWEN3_COMPILE_UPDATE_GOLDENS") == "1"


@pytest.mark.parametrize("graph", ["canonical", "ort"])
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_golden_signature(preset, graph, exported):
    """Fails on any change of I/O names, dtypes, shapes or op counts. If the change is intended, run
    QWEN3_COMPILE_UPDATE_GOLDENS=1 pytest tests/export/test_graph_contract.py and commit the diff."""
    signature = graph_signature(onnx.load(exported[preset, graph].model_path, load_external_data=False))
    path = GOLDEN / f"{preset}.{graph}.json"
    if UPDATE:
        path.write_text(json.dumps(signature, indent=2) + "\n")
    assert signature == json.loads(path.read_text())


def test_io_contract(exported):
    model = onnx.load(exported["tiny-moe", "canonical"].model_path)
    sig = graph_signature(model)
    names = [i["name"] for i in sig["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o["name"] for o in sig["outputs"]][:3] == ["logits", "present.0.key", "present.0.value"]
    assert sig["inputs"][0]["shape"] == ["batch_size", "sequence_length"]
    assert sig["inputs"][3]["shape"] == ["batch_size", 2, "past_sequence_length", 16]
    onnx.checker.check_model(model, full_check=True)


def test_every_expert_present(exported):
    """One ExpertDispatch per layer holding all 16 experts, whatever an example input would route to."""
    model = onnx.load(exported["tiny-moe", "canonical"].model_path)
    nodes = [n for n in model.graph.node if n.op_type == "ExpertDispatch"]
    assert len(nodes) == 2 and all(n.domain == "qwen3_compile" for n in nodes)
    weights = {t.name: t for t in model.graph.initializer}
    for node in nodes:
        assert list(weights[node.input[2]].dims) == [16, 64, 64]  # [E, 2I, H]
        assert list(weights[node.input[3]].dims) == [16, 64, 32]  # [E, H, I]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"top_k": 4, "normalize": 1, "activation": b"silu"}


def test_export_is_byte_deterministic(loaded_presets, tmp_path):
    a = export_onnx(loaded_presets["tiny-moe"], tmp_path / "a")
    b = export_onnx("tiny-moe", tmp_path / "b")  # a fresh load from the preset
    for name in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a.directory / name).read_bytes() == (b.directory / name).read_bytes(), name


def test_side_files_and_manifest(exported):
    folder = exported["tiny-moe", "canonical"].directory
    config = json.loads((folder / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 16
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 1e6
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["options"] == {
        "dtype": "fp32",
        "opset": 21,
        "max_positions": 4096,
    }
    lowered = json.loads((exported["tiny-moe", "ort"].directory / "manifest.json").read_text())
    assert lowered["stage"] == "lower" and lowered["lowering"]["runtime"] == "ort"
    assert lowered["lowering"]["applied"] == {
        "expert_dispatch_to_ort_moe": 2,
        "rms_norm_to_simplified_layer_norm": 9,
    }
    assert lowered["inputs"]["model_sha256"] == manifest["outputs"]["model.onnx"]["sha256"]
    assert set(manifest["outputs"]) >= {
        "model.onnx",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert manifest["inputs"] == {"model": "tiny-moe", "kind": "preset", "seed": 4321, "num_layers": 2}
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).chat_template


@pytest.mark.parametrize(
    "options, field",
    [
        (ExportOptions(dtype="int8"), "--dtype"),
        (ExportOptions(opset=17), "--opset"),
        (ExportOptions(opset=99), "--opset"),
        (ExportOptions(max_positions=10**6), "--max-positions"),
    ],
)
def test_bad_options_refused_before_work(options, field, tmp_path):
    with pytest.raises(BadInputError) as info:
        export_onnx("tiny-moe", tmp_path / "out", options)
    assert info.value.field == field and info.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(loaded_presets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(BadInputError, match="already exists"):
        export_onnx(loaded_presets["tiny-dense"], out)
    assert (out / "keep.txt").exists()
    export_onnx(loaded_presets["tiny-dense"], out, force=True)
    assert (out / "model.onnx").exists() and not (out / "keep.txt").exists()


def test_interrupted_export_leaves_nothing(loaded_presets, tmp_path, monkeypatch):
    def disk_full(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_stage, "save_onnx", disk_full)
    with pytest.raises(OSError):
        export_onnx(loaded_presets["tiny-dense"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_external_data_export_runs(loaded_presets, tmp_path, monkeypatch):
    """Above the protobuf limit weights go to model.onnx.data; forced here on a tiny model."""
    import numpy as np

    from qwen3_compile.backends.base import left_padded_batch
    from qwen3_compile.backends.onnxruntime.runner import OrtRunner
    from qwen3_compile.lower.stage import lower_artifact
    from qwen3_compile.storage import artifact_dir as artifact_io
    from qwen3_compile.storage.external_data import ALIGNMENT, live_bytes

    canonical = export_onnx(loaded_presets["tiny-moe"], tmp_path / "inline-canonical")
    inline = lower_artifact(canonical.directory, tmp_path / "inline", "ort")
    monkeypatch.setattr(artifact_io, "EXTERNAL_DATA_THRESHOLD", 0)
    streamed = export_onnx(loaded_presets["tiny-moe"], tmp_path / "external-canonical")
    assert (streamed.directory / "model.onnx").stat().st_size < 1e6
    model = onnx.load(streamed.model_path, load_external_data=False)
    size = (streamed.directory / "model.onnx.data").stat().st_size
    assert size > 70e6  # the file holds the live tensors only, each aligned
    assert live_bytes(model) <= size <= live_bytes(model) + ALIGNMENT * len(model.graph.initializer)
    external = lower_artifact(streamed.directory, tmp_path / "external", "ort")
    # the lowered copy keeps the export's data file and adds the rewritten experts beside it
    assert (external.directory / "model.onnx.data").stat().st_size == size
    assert (external.directory / "model.lowered.data").stat().st_size > 0
    batch = left_padded_batch([np.random.default_rng().integers(0, 151643, 9).tolist()], 0)
    outputs = []
    for artifact in (inline, external):
        runner = OrtRunner(artifact.model_path)
        outputs.append(
            runner.forward(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(1))[
                0
            ]
        )
    np.testing.assert_array_equal(outputs[0], outputs[1])
