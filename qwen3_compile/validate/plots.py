"""The PNGs of a validation run, each answering one question at a glance:

- `per_prompt.png`: which prompts disagree most? Mean KL per prompt, both reasoning modes side by side,
  the gate drawn.
- `per_position.png`: how are the errors spread? The distribution of per-position KL (a CDF per mode), and
  top-1 agreement along the sequence as a rolling rate.
- `per_layer.png`: where does the artifact start to diverge? Each layer's relative error (bisection).

Legends sit outside the axes, so they never cover data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FLOOR = 1e-9  # KL of exactly 0 (identical logits) still has a place on a log axis
MODE_COLOURS = {"non-thinking": "tab:blue", "thinking": "tab:orange"}
ROLLING_WINDOW = 32


def rolling_rate(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each run of `window` values ending at i (fewer at the start): a rate that reads as a line."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def agreement_by_position(cases: list[dict], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, rate): the fraction of the mode's prompts whose top-1 agrees at each position, counted from the
    end of the prompt (x = 0 is the first generated token), over the prompts that reach it. Aligning on
    the prompt's end puts a long-context case's recorded tail beside the short prompts."""
    rows = []
    for c in cases:
        if c["mode"] == mode:
            values = np.asarray(c["top1_per_position"], dtype=np.float64)
            start = c["first_position"] - c["prompt_tokens"]
            rows.append((start, values))
    if not rows:
        return np.zeros(0, dtype=int), np.zeros(0)
    low = min(start for start, _ in rows)
    high = max(start + len(values) for start, values in rows)
    agree, count = np.zeros(high - low), np.zeros(high - low)
    for start, values in rows:
        agree[start - low : start - low + len(values)] += values
        count[start - low : start - low + len(values)] += 1
    x = np.arange(low, high)
    reached = count > 0
    return x[reached], agree[reached] / count[reached]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(data: dict) -> str:
    return f"{'PASS' if data['passed'] else 'FAIL'}: {Path(data['artifact']).name} vs {data['reference']}"


def plot_prompts(data: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(dict.fromkeys(c["name"] for c in data["cases"]))
    modes = [m for m in MODE_COLOURS if any(c["mode"] == m for c in data["cases"])]
    kl = {(c["name"], c["mode"]): max(c["prefill"]["mean_kl"], FLOOR) for c in data["cases"]}
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(names)))
    height = 0.8 / max(len(modes), 1)
    y = np.arange(len(names))
    for i, mode in enumerate(modes):
        values = [kl.get((name, mode), np.nan) for name in names]
        ax.barh(y + (i - (len(modes) - 1) / 2) * height, values, height, color=MODE_COLOURS[mode], label=mode)
    gate = data["gates"]["max_mean_kl"]
    ax.axvline(gate, color="red", linewidth=1, label=f"gate: mean KL <= {gate:g}")
    spread = max(kl.values()) / min(kl.values()) if kl else 1
    if spread > 30:  # values over decades: a log axis; within one, a linear one from 0 reads better
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, max([*kl.values(), gate]) * 1.1)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # the suite's order, top to bottom
    ax.set_xlabel("prefill mean KL(reference || artifact)" + (", log scale" if spread > 30 else ""))
    ax.set_title(_title(data) + ": mean KL per prompt", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_positions(data: dict, path: Path) -> None:
    plt = _pyplot()
    fig, (ax_cdf, ax_top1) = plt.subplots(1, 2, figsize=(12, 4.2))
    gates = data["gates"]
    for mode, colour in MODE_COLOURS.items():
        cases = [c for c in data["cases"] if c["mode"] == mode]
        if not cases:
            continue
        kl = np.sort(np.maximum(np.concatenate([c["kl_per_position"] for c in cases]), FLOOR))
        ax_cdf.step(kl, np.arange(1, len(kl) + 1) / len(kl), where="post", color=colour, label=mode)
        x, agree = agreement_by_position(cases, mode)
        window = min(ROLLING_WINDOW, max(len(agree), 1))
        ax_top1.plot(x, rolling_rate(agree, window), color=colour, label=mode)
    gate = gates["max_mean_kl"]
    ax_cdf.axvline(gate, color="red", linewidth=1, label=f"mean-KL gate {gate:g}")
    ax_cdf.set_xscale("log")
    ax_cdf.set_ylim(0, 1.02)
    ax_cdf.set_xlabel("KL(reference || artifact) at one position, log scale")
    ax_cdf.set_ylabel("fraction of positions at or below")
    ax_cdf.set_title("Distribution of per-position KL", fontsize=10)
    ax_top1.axhline(gates["min_top1"], color="red", linewidth=1, label=f"top-1 gate {gates['min_top1']:g}")
    ax_top1.set_ylim(0, 1.02)
    ax_top1.axvline(0, color="grey", linewidth=0.8, linestyle=":")
    ax_top1.xaxis.get_major_locator().set_params(integer=True)
    ax_top1.set_xlabel("position from the end of the prompt (0: first teacher-forced decode step)")
    ax_top1.set_ylabel(f"top-1 agreement, rolling mean of {ROLLING_WINDOW}")
    ax_top1.set_title("Top-1 agreement along the sequence (all prompts of a mode)", fontsize=10)
    for ax in (ax_cdf, ax_top1):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(_title(data), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(bisection: dict, path: Path) -> None:
    plt = _pyplot()
    errors = np.maximum(np.asarray(bisection["layer_errors"], dtype=np.float64), FLOOR)
    first = bisection["first_diverging_layer"]
    colours = ["tab:red" if first is not None and i >= first else "tab:blue" for i in range(len(errors))]
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(errors) + 3), 3.6))
    ax.bar(np.arange(len(errors)), errors, color=colours)
    tolerance = bisection["tolerance"]
    ax.axhline(tolerance, color="red", linewidth=1, label=f"tolerance {tolerance:g}")
    if max(errors.max(), tolerance) / errors.min() > 30:  # over decades: log; within one: linear from 0
        ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative error of the layer's output")
    verdict = "no layer above tolerance" if first is None else f"first diverging layer: {first} (red)"
    ax.set_title(f"Layer bisection: {verdict}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
