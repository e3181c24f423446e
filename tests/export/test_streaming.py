"""Bounded-memory export: streamed from safetensors layer by layer, equal to the in-memory export,
resumable after an interruption, clear errors for shards that change under it and for a full disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3_compile.errors import BadInputError
from qwen3_compile.export import stage as export_stage
from qwen3_compile.export import weights as export_weights
from qwen3_compile.export.resume import JOURNAL_FILE, partial_dir
from qwen3_compile.export.stage import ExportOptions, export_onnx
from qwen3_compile.models.loading import load_model
from qwen3_compile.progress import Progress
from qwen3_compile.storage import artifact_dir as artifact_io

LAYERS = 4
FILES = ("model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json")


@pytest.fixture(scope="module")
def layered_checkpoint(tmp_path_factory) -> Path:
    """tiny-moe with 4 layers saved by save_pretrained (per-expert layout), re-sharded one file per layer."""
    root = tmp_path_factory.mktemp("layered")
    saved = root / "saved"
    load_model("tiny-moe", num_layers=LAYERS).model.save_pretrained(saved)
    state = load_file(saved / "model.safetensors")
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        shard = f"layer-{name.split('.')[2]}.safetensors" if ".layers." in name else "rest.safetensors"
        shards.setdefault(shard, {})[name] = tensor
    ckpt = root / "ckpt"
    ckpt.mkdir()
    shutil.copy(saved / "config.json", ckpt)
    for shard, tensors in shards.items():
        save_file(tensors, ckpt / shard)
    weight_map = {n: s for s, tensors in shards.items() for n in tensors}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ckpt


@pytest.fixture
def streamed(monkeypatch):
    """Force external data (and so streaming and the journal) on tiny models; small row blocks so big
    tensors take many blocks and transposed ones are written band by band."""
    monkeypatch.setattr(artifact_io, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(export_weights, "CHUNK_BYTES", 1 << 20)


def _same_files(a: Path, b: Path) -> None:
    for name in FILES:
        if (a / name).exists() or (b / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


class FailAfter(Progress):
    """Progress whose layer counter raises once `layers` layers are written: an injected interruption."""

    def __init__(self, layers: int, action=None):
        self.layers, self.count, self.action = layers, 0, action

    def stage(self, name, total=None, unit=""):
        import contextlib

        @contextlib.contextmanager
        def cm():
            def advance(n=1):
                self.count += n
                if self.count == self.layers:
                    if self.action is None:
                        raise KeyboardInterrupt
                    self.action()

            yield advance

        return cm()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_streamed_equals_in_memory_export(layered_checkpoint, streamed, tmp_path, dtype):
    """The checkpoint streamed in row blocks (per-expert matrices written in place as the fused tensors)
    gives the same bytes as exporting the loaded model's fused state dict, tensor by tensor."""
    options = ExportOptions(dtype=dtype)
    memory = export_onnx(load_model(layered_checkpoint), tmp_path / "memory", options)
    stream = export_onnx(layered_checkpoint, tmp_path / "stream", options)
    _same_files(memory.directory, stream.directory)
    assert (stream.directory / "model.onnx.data").stat().st_size > 70e6 * (0.5 if dtype == "fp16" else 1)


def test_streamed_values_match_the_reference_model(layered_checkpoint, streamed, tmp_path):
    """Independent of the exporter's own code: every weight equals transformers' parameter (linear
    weights transposed, experts fused), read back through onnx's external-data loader."""
    artifact = export_onnx(layered_checkpoint, tmp_path / "out")
    model = onnx.load(artifact.model_path)
    stored = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    reference = load_model(layered_checkpoint).model.state_dict()
    for name, tensor in reference.items():
        if name == "lm_head.weight" or name.endswith(("proj.weight", "gate.weight")):
            assert torch.equal(stored[name + ".T"], tensor.t()), name
        else:
            assert torch.equal(stored[name], tensor), name
    assert len(reference) == 3 + LAYERS * 11


def test_inline_streamed_equals_in_memory(saved_checkpoints, tmp_path):
    """Below the external-data threshold the checkpoint path and the in-memory path agree too (tied
    embeddings, single file)."""
    memory = export_onnx(load_model(saved_checkpoints["tiny-dense"]), tmp_path / "memory")
    stream = export_onnx(saved_checkpoints["tiny-dense"], tmp_path / "stream")
    _same_files(memory.directory, stream.directory)


@pytest.mark.parametrize("fail_after", [1, 3])
def test_interrupted_export_resumes_byte_identical(
    layered_checkpoint, streamed, tmp_path, monkeypatch, fail_after
):
    whole = export_onnx(layered_checkpoint, tmp_path / "whole", ExportOptions(dtype="bf16"))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(layered_checkpoint, out, ExportOptions(dtype="bf16"), progress=FailAfter(fail_after))
    journal = json.loads((partial_dir(out) / JOURNAL_FILE).read_text())
    assert len(journal["offsets"]) == 1 + fail_after  # embeddings + finished layers
    assert not out.exists()

    read: list[str] = []
    original = export_weights.ShardReader.read_rows

    def spy(self, entry, start, stop):
        read.append(entry.name)
        return original(self, entry, start, stop)

    monkeypatch.setattr(export_weights.ShardReader, "read_rows", spy)
    resumed = export_onnx(layered_checkpoint, out, ExportOptions(dtype="bf16"), resume=True)
    _same_files(whole.directory, resumed.directory)
    assert resumed.manifest.resumed_after_groups == 1 + fail_after
    # finished layers are replayed without reading their weights (tiny inline norms aside)
    big_reads = {n for n in read if "norm" not in n}
    assert not any(f"layers.{i}." in n for n in big_reads for i in range(fail_after))
    assert any(f"layers.{fail_after}." in n for n in big_reads)
    assert "model.embed_tokens.weight" not in big_reads
    assert not partial_dir(out).exists() and not (out / JOURNAL_FILE).exists()


@pytest.mark.parametrize("where", ["first group", "last group"])
def test_resume_rewrites_groups_whose_bytes_changed(layered_checkpoint, streamed, tmp_path, where):
    """A partial data file corrupted between runs: resume re-hashes every finished group, writes the changed
    group and everything after it again, and the export is byte-identical to an uninterrupted one."""
    whole = export_onnx(layered_checkpoint, tmp_path / "whole", ExportOptions(dtype="bf16"))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(layered_checkpoint, out, ExportOptions(dtype="bf16"), progress=FailAfter(3))
    journal = json.loads((partial_dir(out) / JOURNAL_FILE).read_text())
    offsets = journal["offsets"]
    assert len(journal["hashes"]) == len(offsets) == 4
    group = 0 if where == "first group" else 3
    start = [0, *offsets][group]
    data = next(p for p in partial_dir(out).iterdir() if p.name.endswith(".data"))
    with data.open("r+b") as f:  # flip one byte in the middle of the group
        f.seek((start + offsets[group]) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    resumed = export_onnx(layered_checkpoint, out, ExportOptions(dtype="bf16"), resume=True)
    _same_files(whole.directory, resumed.directory)
    assert resumed.manifest.resumed_after_groups == group


def test_resume_refuses_other_options(layered_checkpoint, streamed, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(layered_checkpoint, out, ExportOptions(dtype="bf16"), progress=FailAfter(2))
    with pytest.raises(BadInputError, match="other inputs or options") as info:
        export_onnx(layered_checkpoint, out, ExportOptions(dtype="fp16"), resume=True)
    assert info.value.file == str(partial_dir(out))
    # without --resume the stale partial export is discarded and the export starts over
    fresh = export_onnx(layered_checkpoint, out, ExportOptions(dtype="fp16"))
    assert fresh.manifest.resumed_after_groups == 0


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_shard_damaged_mid_stream_then_resume(layered_checkpoint, streamed, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(layered_checkpoint, ckpt)
    shard = ckpt / "layer-2.safetensors"
    backup = shard.read_bytes()

    def break_shard():  # after layer 1 is written, before layer 2 is read
        if damage == "truncate":
            with shard.open("r+b") as f:
                f.truncate(len(backup) // 2)
        else:
            shard.unlink()

    out = tmp_path / "out"
    with pytest.raises(BadInputError) as info:
        export_onnx(ckpt, out, progress=FailAfter(2, break_shard))
    err = info.value
    assert err.file == str(shard) and err.field.startswith("model.layers.2.")
    assert err.field in err.message and "--resume" in err.fix and "2 finished layer(s) of 4" in err.fix
    assert ("cut off" if damage == "truncate" else "no such file") in err.message.lower()
    assert err.exit_code == 2

    shard.write_bytes(backup)  # the user restores the file
    resumed = export_onnx(ckpt, out, resume=True)
    assert resumed.manifest.resumed_after_groups == 3
    _same_files(export_onnx(ckpt, tmp_path / "whole").directory, resumed.directory)


def test_not_enough_disk_refused_before_writing(layered_checkpoint, tmp_path, monkeypatch):
    free = 10_000_000

    class Usage:
        total, used = 10**12, 10**12 - free

    Usage.free = free
    monkeypatch.setattr(export_stage.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(BadInputError) as info:
        export_onnx(layered_checkpoint, tmp_path / "out")
    needed = export_stage.disk_needed(export_stage.resolve_model(layered_checkpoint), ExportOptions())
    assert needed > 70e6  # fp32 embeddings, lm_head and 4 layers
    assert f"({needed} bytes)" in info.value.message and f"({free} bytes) are free" in info.value.message
    assert info.value.field == "--output"
    assert list(tmp_path.iterdir()) == []


def test_disk_needed_is_the_weights(layered_checkpoint):
    source = export_stage.resolve_model(layered_checkpoint)
    fp32 = export_stage.disk_needed(source, ExportOptions())
    bf16 = export_stage.disk_needed(source, ExportOptions(dtype="bf16"))
    assert bf16 < fp32 <= 2 * bf16  # halved, but for what stays fp32 (the MoE router)
    assert fp32 > source.arch.num_layers * 16 * 3 * 64 * 64 * 4  # at least every expert in fp32


def test_cli_resume(layered_checkpoint, streamed, tmp_path):
    from click.testing import CliRunner

    from qwen3_compile.cli import main

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(layered_checkpoint, out, progress=FailAfter(2))
    result = CliRunner().invoke(main, ["export", str(layered_checkpoint), "-o", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    # non-terminal stderr gets one line per layer with an ETA, counting only the layers still to do
    assert "export layers (resumed after 2): 1/2 layers" in result.output and "ETA" in result.output
    assert json.loads((out / "manifest.json").read_text())["resumed_after_groups"] == 3
    _same_files(export_onnx(layered_checkpoint, tmp_path / "whole").directory, out)


def test_line_progress_eta():
    import io

    from qwen3_compile.progress import LineProgress

    ticks = iter([100.0, 130.0, 160.0, 220.0])  # start, then after 1, 2 and 4 layers
    stream = io.StringIO()
    progress = LineProgress(stream, clock=lambda: next(ticks))
    with progress.stage("export layers", total=10, unit="layers") as advance:
        advance(1)
        advance(1)
        advance(2)
    assert stream.getvalue().splitlines() == [
        "export layers: 1/10 layers, 0:30 elapsed, ETA 4:30",
        "export layers: 2/10 layers, 1:00 elapsed, ETA 4:00",
        "export layers: 4/10 layers, 2:00 elapsed, ETA 3:00",
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_has_nonfinite_agrees_with_torch(dtype):
    from qwen3_compile.export.weights import has_nonfinite

    info = torch.finfo(dtype)
    specials = [
        float("nan"),
        float("inf"),
        -float("inf"),
        info.max,
        -info.max,
        info.tiny,
        info.tiny / 4,
        0.0,
        -0.0,
    ]
    for value in specials:
        block = torch.randn(64, 32).to(dtype)
        block[5, 7] = value
        assert has_nonfinite(block) == (not bool(torch.isfinite(block).all())), (dtype, value)


def test_nonfinite_weight_refused_mid_stream(layered_checkpoint, streamed, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(layered_checkpoint, ckpt)
    shard = ckpt / "layer-3.safetensors"
    tensors = load_file(shard)
    name = "model.layers.3.mlp.experts.9.up_proj.weight"
    tensors[name][4, 2] = float("nan")
    save_file(tensors, shard)
    with pytest.raises(BadInputError, match="NaN or Inf") as info:
        export_onnx(ckpt, tmp_path / "out")
    assert info.value.field == name and info.value.file == str(shard)
    assert "--allow-nonfinite" in info.value.fix
    allowed = export_onnx(ckpt, tmp_path / "allowed", allow_nonfinite=True)
    assert (allowed.directory / "model.onnx.data").exists()


def test_disk_full_mid_export_then_resume(layered_checkpoint, streamed, tmp_path):
    import errno

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    with pytest.raises(BadInputError, match="disk filled up") as info:
        export_onnx(layered_checkpoint, out, progress=FailAfter(3, disk_full))
    assert "3 finished layer(s) of 4" in info.value.fix and info.value.file == str(partial_dir(out))
    resumed = export_onnx(layered_checkpoint, out, resume=True)
    _same_files(export_onnx(layered_checkpoint, tmp_path / "whole").directory, resumed.directory)
