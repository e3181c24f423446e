"""The sampler: mode defaults, its filtered distribution against an independent numpy computation and
against transformers' own warpers, sampling frequencies, seeding, greedy, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3_compile.errors import BadInputError
from qwen3_compile.generation.sampling import (
    GREEDY,
    Sampler,
    SamplingConfig,
    default_sampling,
    filtered_logits,
    sampling_probs,
)


def independent_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Written from the definitions, descending: softmax of logits / T, keep the k most likely, then the
    smallest most-likely-first prefix holding at least top_p of the remaining mass."""
    probs = np.exp(logits / temperature - (logits / temperature).max())
    probs /= probs.sum()
    order = list(np.argsort(-probs))
    if top_k:
        order = order[:top_k]
    mass = probs[order] / probs[order].sum()
    # top_p = 1 disables the filter (a float sum of the mass before a far-tail token can round to 1.0)
    kept = [token for i, token in enumerate(order) if i == 0 or top_p == 1.0 or mass[:i].sum() < top_p]
    out = np.zeros_like(probs)
    out[kept] = probs[kept] / probs[kept].sum()
    return out


def test_mode_defaults_are_the_model_card_values():
    assert default_sampling(True) == SamplingConfig(temperature=0.6, top_p=0.95, top_k=20)
    assert default_sampling(False) == SamplingConfig(temperature=0.7, top_p=0.8, top_k=20)


@pytest.mark.parametrize("trial", range(12))
def test_filtered_distribution_matches_independent_computation(trial):
    rng = np.random.default_rng()
    vocab = int(rng.integers(50, 3000))
    logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 6)).astype(np.float32)
    config = SamplingConfig(
        temperature=float(rng.uniform(0.2, 2.0)),
        top_p=float(rng.choice([1.0, 0.95, 0.8, 0.5, 0.1])),
        top_k=int(rng.choice([0, 1, 5, 20, 200])),
    )
    expected = independent_probs(logits.astype(np.float64), config.temperature, config.top_k, config.top_p)
    got = sampling_probs(logits, config)
    np.testing.assert_array_equal(got > 0, expected > 0, err_msg=str(config))
    np.testing.assert_allclose(got, expected, atol=1e-12, err_msg=str(config))


def test_filter_order_matches_transformers_generate(run_presets):
    """transformers' own generate (output_logits: raw, output_scores: after its warpers) against ours on
    the same raw logits: the same tokens survive, with the same scores."""
    model = run_presets["tiny-dense"][0].model
    rng = np.random.default_rng()
    prompt = torch.from_numpy(rng.integers(0, 151643, size=(1, int(rng.integers(4, 16)))))
    for temperature, top_p, top_k in [(0.6, 0.95, 20), (0.7, 0.8, 20), (2.0, 0.5, 100), (0.3, 0.3, 0)]:
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=3,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=151643,
        )
        config = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
        for raw, processed in zip(out.logits, out.scores, strict=True):
            ours, theirs = filtered_logits(raw[0].numpy(), config), processed[0].double().numpy()
            kept = np.isfinite(ours)
            np.testing.assert_array_equal(kept, np.isfinite(theirs), err_msg=str(config))
            assert kept.sum() < kept.size, "the filters removed nothing: the test checks too little"
            np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-5)


def test_peaked_distributions_match_transformers_warpers():
    """Random-weight logits are flat; on peaked ones the nucleus is a handful of tokens, where the
    order (temperature before top-p) changes which survive."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng()
    for _ in range(20):
        logits = rng.standard_normal(2000) * rng.uniform(2, 8)
        config = SamplingConfig(
            temperature=float(rng.uniform(0.3, 1.5)),
            top_p=float(rng.uniform(0.5, 0.99)),
            top_k=int(rng.choice([0, 20])),
        )
        # transformers' warpers, appended in GenerationMixin._get_logits_processor's order
        scores = torch.from_numpy(logits)[None]
        scores = TemperatureLogitsWarper(config.temperature)(None, scores)
        if config.top_k:
            scores = TopKLogitsWarper(config.top_k)(None, scores)
        scores = TopPLogitsWarper(config.top_p)(None, scores)[0].numpy()
        ours = filtered_logits(logits, config)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(scores), err_msg=str(config))


def test_sampling_frequencies_follow_the_distribution():
    rng = np.random.default_rng()
    logits = rng.standard_normal(40) * 2
    config = SamplingConfig(temperature=0.8, top_p=0.9, top_k=12)
    probs = sampling_probs(logits, config)
    sampler = Sampler(config, seed=int(rng.integers(2**32)))
    draws = np.bincount([sampler(logits) for _ in range(20000)], minlength=40) / 20000
    assert np.all(draws[probs == 0] == 0), "a filtered token was sampled"
    assert np.abs(draws - probs).max() < 0.02


def test_seeded_sampler_is_reproducible():
    logits = np.random.default_rng().standard_normal(1000)
    config = default_sampling(True)
    a, b, c = Sampler(config, seed=7), Sampler(config, seed=7), Sampler(config, seed=8)
    first = [a(logits) for _ in range(50)]
    assert first == [b(logits) for _ in range(50)]
    assert first != [c(logits) for _ in range(50)]


def test_greedy_is_argmax_and_top_k_one_is_argmax():
    logits = np.random.default_rng().standard_normal(5000).astype(np.float32)
    assert Sampler(GREEDY)(logits) == int(np.argmax(logits))
    assert Sampler(SamplingConfig(top_k=1), seed=0)(logits) == int(np.argmax(logits))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"temperature": 0.0}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"top_k": -1}, "--top-k")],
)
def test_bad_settings_name_the_option(kwargs, field):
    with pytest.raises(BadInputError) as err:
        SamplingConfig(**kwargs)
    assert err.value.field == field and err.value.fix
