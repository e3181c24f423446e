"""Presets: published parameter counts, structural traits of the tiny presets, layer cutting."""

from __future__ import annotations

import pytest

from qwen3_compile.models.presets import get_preset, preset_names
from qwen3_compile.sizing import count_parameters

# the published releases (tiny and trained presets are ours)
REAL = [n for n in preset_names() if not n.startswith("tiny-") and get_preset(n).checkpoint is None]


@pytest.mark.parametrize("name", REAL)
def test_counts_match_published_figures(name):
    preset = get_preset(name)
    counts = count_parameters(preset.arch)
    # model cards round to two or three significant digits: hold us to 2%
    assert counts.total / 1e9 == pytest.approx(preset.published_params_b, rel=0.02)
    assert counts.non_embedding / 1e9 == pytest.approx(preset.published_non_embedding_b, rel=0.02)
    if preset.arch.is_moe:
        assert counts.active / 1e9 == pytest.approx(preset.published_active_b, rel=0.02)
    else:
        assert counts.active == counts.total


def test_every_real_release_has_a_preset():
    for size in ("0.6b", "1.7b", "4b", "8b", "14b", "32b", "30b-a3b", "235b-a22b"):
        assert f"qwen3-{size}" in preset_names()
    for size in ("4b", "30b-a3b", "235b-a22b"):
        for kind in ("instruct", "thinking"):
            arch = get_preset(f"qwen3-{size}-{kind}-2507").arch
            assert arch.max_position_embeddings == 262144 and arch.rope_theta in (5e6, 1e7)


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_parameter_count_matches_torch(name):
    """Our closed-form count against the numel of transformers' model built from the preset."""
    from qwen3_compile.models.loading import load_model

    model = load_model(name).model
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(get_preset(name).arch).total == sum(unique.values())


def test_tiny_presets_are_structurally_faithful():
    dense, moe = get_preset("tiny-dense").arch, get_preset("tiny-moe").arch
    for arch in (dense, moe):
        assert arch.num_heads // arch.num_kv_heads > 1
        assert arch.head_dim != arch.hidden_size // arch.num_heads
        assert arch.vocab_size == 151936
    assert dense.tie_word_embeddings and not moe.tie_word_embeddings
    assert moe.num_experts >= 16 and moe.top_k >= 2 and moe.norm_topk_prob


def test_real_width_slice():
    arch = get_preset("qwen3-30b-a3b", num_layers=2).arch
    full = get_preset("qwen3-30b-a3b").arch
    assert arch.num_layers == 2 and arch.hidden_size == full.hidden_size == 2048
    assert arch.num_experts == 128


def test_random_weights_do_not_depend_on_depth():
    from qwen3_compile.models.loading import random_state_dict

    arch = get_preset("tiny-moe").arch
    two, one = random_state_dict(arch, 7), random_state_dict(arch.with_layers(1), 7)
    for name, tensor in one.items():
        assert (two[name] == tensor).all(), name
