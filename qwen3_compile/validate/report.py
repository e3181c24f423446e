"""report.json (machines), report.md (people) and PNG plots of a validation run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3_compile.schema import decode, encode
from qwen3_compile.storage.manifests import ValidationRecord

if TYPE_CHECKING:
    from qwen3_compile.validate.stage import ValidationReport


def write_report(report: ValidationReport, folder: Path) -> None:
    data = encode(decode(ValidationRecord, report.to_dict(), file=folder / "report.json"))  # the file's shape
    (folder / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(data))
    plot_positions(data, folder / "per_position.png")
    if data["bisection"]:
        plot_layers(data["bisection"], folder / "per_layer.png")


def render_markdown(data: dict) -> str:
    verdict = "PASS" if data["passed"] else "FAIL"
    s, g = data["summary"], data["gates"]
    lines = [
        f"# Validation: {verdict}",
        "",
        f"Artifact `{data['artifact']}` ({data['backend']}) against `{data['reference']}` (PyTorch fp32), "
        f"modes: {', '.join(data['modes'])}. Gates: {data['gates_source']}.",
        "",
    ]
    settings = data.get("backend_settings") or {}
    if settings:
        config = ", ".join(f"`{k}={v}`" for k, v in settings.get("session_config", {}).items())
        lines += [
            f"ONNX Runtime ran it at optimisation level `{settings['optimization']}`"
            + (f" with {config}" if config else "")
            + " (from the artifact's manifest).",
            "",
        ]
    if data["failures"]:
        lines += ["## Failures", "", *[f"- {f}" for f in data["failures"]], ""]
    lines += [
        "## Summary",
        "",
        "| part | positions | mean KL | max KL | top-1 | min cosine | max abs |",
        "|---|---|---|---|---|---|---|",
    ]
    for part in ("prefill", "decode"):
        p = s[part]
        lines.append(
            f"| {part} | {p['positions']} | {p['mean_kl']:.3g} | {p['max_kl']:.3g} | {p['top1']:.2%} | "
            f"{p['min_cosine']:.6f} | {p['max_abs']:.3g} |"
        )
    lines += [
        "",
        f"Free-running greedy decode matches the reference on {s['greedy_match_fraction']:.1%} of steps.",
        "",
        f"Gates: mean KL <= {g['max_mean_kl']:g}, top-1 >= {g['min_top1']:g}, "
        f"max abs <= {g['max_abs'] if g['max_abs'] is not None else 'not gated'}, "
        f"greedy match >= {g['min_greedy_match']:.0%}.",
        "",
        "## Prompts",
        "",
        "| prompt | category | mode | tokens | prefill mean KL | prefill top-1 | decode top-1 | greedy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in data["cases"]:
        lines.append(
            f"| {c['name']} | {c['category']} | {c['mode']} | {c['prompt_tokens']} | "
            f"{c['prefill']['mean_kl']:.3g} | {c['prefill']['top1']:.2%} | {c['decode']['top1']:.2%} | "
            f"{c['greedy_match']}/{c['decode_steps']} |"
        )
    b = data["bisection"]
    if b:
        first = b["first_diverging_layer"]
        lines += [
            "",
            "## Layer bisection",
            "",
            f"First layer above the relative-error tolerance {b['tolerance']:g}: "
            f"{'none' if first is None else first}.",
            "",
            "| layer | relative error |",
            "|---|---|",
        ]
        lines += [f"| {i} | {e:.3g} |" for i, e in enumerate(b["layer_errors"])]
    lines += [
        "",
        "Plots: `per_position.png` (KL and top-1 per position), `per_layer.png` (layer errors).",
        "",
    ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_positions(data: dict, path: Path) -> None:
    plt = _pyplot()
    fig, (ax_kl, ax_top1) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for c in data["cases"]:
        kl = [max(v, 1e-12) for v in c["kl_per_position"]]
        x = range(c["first_position"], c["first_position"] + len(kl))
        style = "-" if c["mode"] == "thinking" else "--"
        ax_kl.plot(x, kl, style, linewidth=0.8, label=f"{c['name']} ({c['mode']})")
        ax_top1.plot(x, [float(v) for v in c["top1_per_position"]], style, linewidth=0.8)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL(reference || artifact)")
    ax_kl.axhline(data["gates"]["max_mean_kl"], color="red", linewidth=0.8, label="gate (mean)")
    ax_top1.set_ylabel("top-1 agrees")
    ax_top1.set_xlabel("token position (prompt, then teacher-forced decode)")
    ax_top1.set_xscale("symlog", linthresh=256)
    ax_top1.set_ylim(-0.1, 1.1)
    ax_kl.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{'PASS' if data['passed'] else 'FAIL'}: {data['artifact']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(bisection: dict, path: Path) -> None:
    plt = _pyplot()
    errors = [max(e, 1e-12) for e in bisection["layer_errors"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    first = bisection["first_diverging_layer"]
    colors = ["tab:red" if first is not None and i >= first else "tab:blue" for i in range(len(errors))]
    ax.bar(range(len(errors)), errors, color=colors)
    ax.axhline(bisection["tolerance"], color="red", linewidth=0.8, label="tolerance")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative error of the layer output")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
