"""Recipes are data: decoded through an allow-list, round-trip exact, errors list the valid choices."""

from __future__ import annotations

import tomllib

import pytest

from qwen3_compile.errors import BadInputError
from qwen3_compile.quantize.recipe import QuantRecipe, builtin_recipes, load_recipe


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_round_trip(name):
    recipe = load_recipe(name)
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe
    raw = tomllib.loads(builtin_recipes()[name].read_text())
    assert recipe.to_dict() == raw


def test_selection_skips_router_head_embeddings_norms():
    select = load_recipe("int8-wo").select
    assert select.selects("model.layers.3.self_attn.q_proj.weight")
    assert select.selects("model.layers.3.mlp.experts.gate_up_proj")
    for name in (
        "model.layers.3.mlp.gate.weight",
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.3.input_layernorm.weight",
        "model.layers.3.self_attn.q_norm.weight",
    ):
        assert not select.selects(name), name


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(BadInputError) as info:
        load_recipe("int3-magic")
    assert "int8-wo" in info.value.fix and info.value.field == "--recipe"


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"weights": {"dtype": "int8", "bits": 8}}, "weights.bits"),
        ({"colour": "blue"}, "colour"),
        ({"version": 9}, "version"),
        ({"weights": {"dtype": "int2"}}, "weights.dtype"),
        # hostile values an allow-list of names let through
        ({"gates": {"max_mean_kl": float("nan"), "min_top1": 0.9}}, "gates.max_mean_kl"),
        ({"gates": {"max_mean_kl": float("inf"), "min_top1": 0.9}}, "gates.max_mean_kl"),
        ({"gates": {"max_mean_kl": -0.1, "min_top1": 0.9}}, "gates.max_mean_kl"),
        ({"gates": {"max_mean_kl": 0.1, "min_top1": 1.5}}, "gates.min_top1"),
        ({"select": {"include": "q_proj"}}, "select.include"),  # a string read as a list of characters
        ({"select": {"include": ["q_proj", "(unclosed"]}}, "select.include[1]"),
        ({"calibration": {"samples": 1e9}}, "calibration.samples"),
        ({"calibration": {"samples": 1_000_000_000}}, "calibration.samples"),
        ({"calibration": {"samples": True}}, "calibration.samples"),
        ({"calibration": {"max_tokens": 1}}, "calibration.max_tokens"),
        ({"activations": {"dtype": "int8"}, "smoothquant": {"alpha": 1.5}}, "smoothquant.alpha"),
        ({"smoothquant": {"alpha": 0.5}}, "smoothquant"),  # SmoothQuant without W8A8
        ({"version": "1"}, "version"),
        # INT4: per group only, a power-of-two group size, weight-only, AWQ only over INT4
        ({"weights": {"dtype": "int4", "granularity": "per_channel"}}, "weights.granularity"),
        ({"weights": {"dtype": "int4", "granularity": "per_group"}}, "weights.group_size"),
        ({"weights": {"dtype": "int4", "granularity": "per_group", "group_size": 96}}, "weights.group_size"),
        ({"weights": {"dtype": "int4", "granularity": "per_group", "group_size": 8}}, "weights.group_size"),
        ({"weights": {"dtype": "int8", "granularity": "per_group", "group_size": 64}}, "weights.granularity"),
        ({"weights": {"dtype": "int8", "group_size": 64}}, "weights.group_size"),
        (
            {"weights": {"dtype": "int4", "granularity": "per_group", "group_size": 64}, "activations": {}},
            "activations",
        ),
        ({"awq": {"grid": 20}}, "awq"),
    ],
)
def test_bad_recipe_fields(edit, field):
    data = load_recipe("int8-wo").to_dict() | edit
    with pytest.raises(BadInputError) as info:
        QuantRecipe.from_dict(data, "my.toml")
    assert info.value.field == field and "my.toml" in info.value.message
