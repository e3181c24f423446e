"""Loading save_pretrained checkpoints bit-exactly, and refusing every kind of bad checkpoint."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.checkpoint import open_checkpoint
from qwen3_compile.models.loading import load_model
from qwen3_compile.models.tensors import ExpertLayout


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-dense-sharded", "tiny-moe-sharded"])
def test_save_pretrained_reloads_bit_identical(saved_checkpoints, name):
    preset = name.removesuffix("-sharded")
    ids = torch.randint(0, 151936, (2, 9))
    reference = _logits(load_model(preset).model, ids)
    reloaded = load_model(saved_checkpoints[name])
    assert torch.equal(_logits(reloaded.model, ids), reference)
    if name.endswith("sharded"):
        assert len(reloaded.source.checkpoint.files) > 1


def test_per_expert_layout_on_disk(saved_checkpoints):
    ckpt = open_checkpoint(saved_checkpoints["tiny-moe"])
    assert ckpt.expert_layout is ExpertLayout.PER_EXPERT
    assert "model.layers.0.mlp.experts.15.down_proj.weight" in ckpt.tensors


def test_fused_expert_layout_loads(saved_checkpoints, checkpoint_copy):
    """A checkpoint written with transformers-5 in-memory keys (gate_up_proj [E,2I,H]) loads the same."""
    src = checkpoint_copy("tiny-moe")
    model = load_model("tiny-moe").model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (src / "model.safetensors").unlink()
    save_file(state, src / "model.safetensors")
    ckpt = open_checkpoint(src)
    assert ckpt.expert_layout is ExpertLayout.FUSED
    ids = torch.randint(0, 151936, (1, 7))
    assert torch.equal(_logits(load_model(src).model, ids), _logits(model, ids))


def test_tied_checkpoint_without_lm_head(saved_checkpoints):
    ckpt = open_checkpoint(saved_checkpoints["tiny-dense"])
    assert ckpt.arch.tie_word_embeddings and "lm_head.weight" not in ckpt.tensors


# ---- bad input: each names the file and field, says how to fix it --------------------------------


def _refused(path, *, file_part: str, field: str | None = None, match: str | None = None):
    with pytest.raises(BadInputError) as info:
        load_model(path)
    err = info.value
    assert err.exit_code == 2
    assert file_part in (err.file or ""), err.message
    if field is not None:
        assert err.field == field, err.message
    if match is not None:
        assert match in err.message, err.message
    assert "Fix:" in err.message
    return err


def test_missing_config(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-dense")
    (ckpt / "config.json").unlink()
    _refused(ckpt, file_part="config.json", match="missing")


def test_malformed_config(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-dense")
    (ckpt / "config.json").write_text("{not json")
    _refused(ckpt, file_part="config.json", match="not valid JSON")


def test_unknown_model_type(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-dense")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _refused(ckpt, file_part="config.json", field="model_type")


def test_truncated_safetensors(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-moe")
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _refused(ckpt, file_part="model.safetensors", match="truncated")


def test_corrupt_safetensors_header(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-moe")
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 16] = b"\x00garbage-bytes!!"
    path.write_bytes(bytes(data))
    _refused(ckpt, file_part="model.safetensors", match="corrupt")


def test_missing_shard(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-moe-sharded")
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _refused(ckpt, file_part="model.safetensors.index.json", field="weight_map", match=shard.name)


def test_wrong_shape(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-dense")
    path = ckpt / "model.safetensors"
    state = load_file(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    state[name] = state[name][:-1].contiguous()
    save_file(state, path)
    _refused(ckpt, file_part="model.safetensors", field=name, match="shape")


def test_config_not_matching_weights(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-moe")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _refused(ckpt, file_part=ckpt.name, field="model.layers.2.input_layernorm.weight", match="missing")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_refused_unless_allowed(checkpoint_copy, value):
    ckpt = checkpoint_copy("tiny-moe")
    path = ckpt / "model.safetensors"
    state = load_file(path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    state[name][2, 5] = value
    save_file(state, path)
    _refused(ckpt, file_part="model.safetensors", field=name, match="NaN or Inf")
    loaded = load_model(ckpt, allow_nonfinite=True)
    assert not torch.isfinite(loaded.model.model.layers[1].mlp.experts.gate_up_proj).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int32])
def test_has_nonfinite_agrees_with_torch_in_every_chunk(dtype, monkeypatch):
    """The exponent-bit check equals torch.isfinite, wherever the value sits (chunk boundaries included,
    strided tensors too); dtypes without a bit pattern go through torch.isfinite."""
    from qwen3_compile.models import checkpoint

    monkeypatch.setattr(checkpoint, "_NONFINITE_CHUNK", 100)
    floating = dtype.is_floating_point
    values = [float("nan"), float("inf"), -float("inf"), torch.finfo(dtype).max, 0.0] if floating else [7]
    for value in values:
        for index in (0, 99, 100, 2047):
            block = torch.randn(64, 32).to(dtype)
            block.view(-1)[index] = value
            for tensor in (block, block.t()):
                expected = not bool(torch.isfinite(tensor).all())
                assert checkpoint.has_nonfinite(tensor) == expected, (dtype, value, index)


def test_bin_only_checkpoint(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-dense")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    err = _refused(ckpt, file_part="pytorch_model.bin", match="pickle")
    assert "save_pretrained" in err.fix and "safe_serialization" in err.fix


def test_unreadable_paths(tmp_path):
    _refused(tmp_path / "does-not-exist", file_part="does-not-exist", match="does not exist")
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"x")
    _refused(a_file, file_part="weights.safetensors", match="directory")


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads any directory, so permissions cannot make it unreadable"
)
def test_permission_denied_directory(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-dense")
    ckpt.chmod(0o000)
    try:
        _refused(ckpt, file_part=ckpt.name, match="not readable")
    finally:
        ckpt.chmod(0o755)
