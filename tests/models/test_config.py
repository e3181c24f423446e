"""Reading config.json in both writers' spellings, and refusing configs that would silently mislead."""

from __future__ import annotations

import json

import pytest

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.presets import get_preset

# Qwen3-30B-A3B's config.json as published (transformers 4.x spelling), trimmed to the fields read
PUBLISHED_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def test_published_4x_config_matches_preset():
    assert Qwen3Arch.from_hf_dict(PUBLISHED_30B_A3B) == get_preset("qwen3-30b-a3b").arch


def test_transformers5_spelling_matches_4x_spelling():
    cfg = dict(PUBLISHED_30B_A3B)
    cfg["num_local_experts"] = cfg.pop("num_experts")
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    assert Qwen3Arch.from_hf_dict(cfg) == Qwen3Arch.from_hf_dict(PUBLISHED_30B_A3B)


def test_config_written_by_transformers5_reads_back(tmp_path):
    from transformers import Qwen3MoeConfig

    arch = get_preset("tiny-moe").arch
    arch.to_transformers_config().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "num_local_experts" in written or "num_experts" in written
    assert Qwen3Arch.from_config_file(tmp_path / "config.json") == arch
    assert Qwen3MoeConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == arch.rope_theta


def test_our_config_is_read_correctly_by_transformers(tmp_path):
    from transformers import AutoConfig

    arch = get_preset("qwen3-30b-a3b-instruct-2507").arch
    (tmp_path / "config.json").write_text(json.dumps(arch.to_hf_dict()))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.rope_parameters["rope_theta"] == 1e7
    assert cfg.num_experts == 128 and cfg.norm_topk_prob is True


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"rope_theta": None}, "rope_theta"),
        ({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e7}}, "rope_theta"),
        ({"num_local_experts": 64}, "num_experts"),
        ({"num_experts": None}, "num_experts"),
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": "2048"}, "hidden_size"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"mlp_only_layers": [0]}, "mlp_only_layers / decoder_sparse_step"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"num_experts_per_tok": 200}, "num_experts_per_tok"),
    ],
)
def test_bad_config_names_the_field(edit, field):
    cfg = {**PUBLISHED_30B_A3B, **edit}
    cfg = {k: v for k, v in cfg.items() if v is not None or k == "rope_scaling"}
    with pytest.raises(BadInputError) as info:
        Qwen3Arch.from_hf_dict(cfg, "ckpt/config.json")
    assert info.value.field == field
    assert "ckpt/config.json" in info.value.message and "Fix:" in info.value.message


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "qwen3",\n "hidden_size": }')
    with pytest.raises(BadInputError, match="line 2") as info:
        Qwen3Arch.from_config_file(path)
    assert str(path) in info.value.message


def test_every_preset_round_trips_through_config_json():
    """What we write as config.json reads back to the same architecture through the strict decoder."""
    from qwen3_compile.models.presets import preset_names

    for name in preset_names():
        arch = get_preset(name).arch
        assert Qwen3Arch.from_hf_dict(json.loads(json.dumps(arch.to_hf_dict()))) == arch, name


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"rope_theta": float("inf")}, "rope_theta"),
        ({"norm_topk_prob": 1}, "norm_topk_prob"),
        ({"eos_token_id": [151645, 200000]}, "eos_token_id"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ],
)
def test_nonfinite_and_absurd_values_from_a_dict(edit, field):
    """Manifests hand architectures over as dicts, not JSON text: NaN can arrive that way too."""
    with pytest.raises(BadInputError) as info:
        Qwen3Arch.from_hf_dict({**PUBLISHED_30B_A3B, **edit}, "manifest.json")
    assert info.value.field == field
