"""The validation plots: the rolling rate and the position alignment against numpy, and every plot drawn
for the edge cases a run can produce (a prompt with zero KL, one position, no bisection, one mode)."""

from __future__ import annotations

import numpy as np

from qwen3_compile.validate.plots import (
    agreement_by_position,
    plot_layers,
    plot_positions,
    plot_prompts,
    rolling_rate,
)


def test_rolling_rate_matches_a_direct_mean():
    values = np.random.default_rng().random(57)
    for window in (1, 5, 32, 100):
        direct = [values[max(0, i + 1 - window) : i + 1].mean() for i in range(len(values))]
        # a difference of running sums (up to 57) loses ~57 x 2^-52 absolutely where the window's mean is
        # small (window 1), so the bound is absolute as well as relative
        np.testing.assert_allclose(
            rolling_rate(values, window), direct, rtol=1e-12, atol=len(values) * 2**-50
        )


def test_agreement_is_aligned_on_the_end_of_the_prompt():
    cases = [
        {"mode": "thinking", "first_position": 0, "prompt_tokens": 3, "top1_per_position": [1, 1, 0, 1]},
        # a long-context tail: positions 100..102 of a 102-token prompt
        {"mode": "thinking", "first_position": 100, "prompt_tokens": 102, "top1_per_position": [0, 0, 1]},
        {"mode": "non-thinking", "first_position": 0, "prompt_tokens": 1, "top1_per_position": [0]},
    ]
    x, rate = agreement_by_position(cases, "thinking")
    np.testing.assert_array_equal(x, [-3, -2, -1, 0])
    np.testing.assert_allclose(rate, [1.0, 0.5, 0.0, 1.0])  # -2: one of two agrees; -1: neither


def _data(cases, bisection=None):
    gates = {"max_mean_kl": 0.05, "min_top1": 0.85, "max_abs": None}
    return {"passed": True, "artifact": "a/int8", "reference": "tiny", "gates": gates, "cases": cases}


def _case(name, mode, kl, first=0):
    top1 = [k < 0.1 for k in kl]
    prefill = {"mean_kl": float(np.mean(kl))}
    return {
        "name": name,
        "mode": mode,
        "first_position": first,
        "prompt_tokens": len(kl),
        "prefill": prefill,
        "kl_per_position": kl,
        "top1_per_position": top1,
    }


def test_plots_are_written_for_edge_cases(tmp_path):
    cases = [
        _case("zero", "thinking", [0.0, 0.0, 0.0]),
        _case("zero", "non-thinking", [0.0, 1e-3]),
        _case("one-position", "thinking", [0.2]),
        _case("spread", "non-thinking", list(np.geomspace(1e-6, 3.0, 40))),
    ]
    for name, data in (("both", _data(cases)), ("one-mode", _data(cases[:1]))):
        plot_prompts(data, tmp_path / f"{name}-prompt.png")
        plot_positions(data, tmp_path / f"{name}-position.png")
    plot_layers(
        {"tolerance": 0.05, "layer_errors": [0.0, 0.01, 0.2], "first_diverging_layer": 2},
        tmp_path / "layers.png",
    )
    plot_layers(
        {"tolerance": 0.05, "layer_errors": [0.01], "first_diverging_layer": None}, tmp_path / "one.png"
    )
    for png in tmp_path.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png.name
