"""report.json (machines), report.md (people) and PNG plots of a validation run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3_compile.schema import decode, encode
from qwen3_compile.storage.manifests import ValidationRecord
from qwen3_compile.validate.plots import plot_layers, plot_positions, plot_prompts

if TYPE_CHECKING:
    from qwen3_compile.validate.stage import ValidationReport


def write_report(report: ValidationReport, folder: Path) -> None:
    data = encode(decode(ValidationRecord, report.to_dict(), file=folder / "report.json"))  # the file's shape
    (folder / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(data))
    plot_prompts(data, folder / "per_prompt.png")
    plot_positions(data, folder / "per_position.png")
    if data["bisection"]:
        plot_layers(data["bisection"], folder / "per_layer.png")


def render_markdown(data: dict) -> str:
    verdict = "PASS" if data["passed"] else "FAIL"
    s, g = data["summary"], data["gates"]
    lines = [
        f"# Validation: {verdict}",
        "",
        f"Artifact `{data['artifact']}` ({data['backend']}) against `{data['reference']}` "
        f"(PyTorch fp32 on {data['reference_device']}), "
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
    env = data.get("environment")
    if env:
        packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
        lines += [
            f"Computed with Python {env['python']} on {env['processor']} ({env['machine']}): {packages}.",
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
        f"Gates: mean KL <= {g['max_mean_kl']:g}, top-1 >= {g['min_top1']:g}"
        + (
            f" (a swap of tokens the reference ranks within 2 x max abs = {2 * g['max_abs']:g} is allowed)"
            if g["max_abs"] is not None
            else ""
        )
        + ", "
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
    check = data.get("recipe_check")
    if check:
        lines += [
            "",
            "## Against the recipe's own model",
            "",
            "The recipe applied in PyTorch (the checkpoint's weights with the recorded scales, "
            "fake-quantized; the recorded activation and KV-cache ranges), fed the same tokens: a correct "
            "artifact agrees to float rounding.",
            "",
            "| positions | median max abs | positions above tolerance | mean KL | top-1 | tolerance "
            "| passed |",
            "|---|---|---|---|---|---|---|",
            f"| {check['positions']} | {check['median_max_abs']:.3g} | {check['fraction_above']:.1%} | "
            f"{check['mean_kl']:.3g} | {check['top1']:.2%} | {check['tolerance']:.3g} | "
            f"{'yes' if check['passed'] else 'no'} |",
        ]
        if check.get("noise_median_max_abs") is not None:
            lines += [
                "",
                "fp16 graph: the recipe's model run in fp16 sits at a median "
                f"{check['noise_median_max_abs']:.3g} from itself in fp32; the tolerance is a multiple of "
                "that.",
            ]
        b = check.get("bisection")
        if b:
            first = b["first_diverging_layer"]
            errors = ", ".join(f"{e:.2g}" for e in b["layer_errors"])
            limit = (
                f"{b['tolerance']:g}"
                if not b.get("layer_tolerances")
                else "its layer's tolerance (" + ", ".join(f"{t:.2g}" for t in b["layer_tolerances"]) + ")"
            )
            lines += [
                "",
                f"Layer errors against the recipe's model (relative): {errors}; first above {limit}: "
                f"{'none' if first is None else f'layer {first}'}.",
            ]
    ppl = data.get("perplexity")
    if ppl:
        gate = g.get("max_ppl_increase")
        lines += [
            "",
            "## Perplexity",
            "",
            f"On {'the built-in held-out text' if ppl['text'] == 'built-in' else '`' + ppl['text'] + '`'}: "
            f"{ppl['windows']} windows of {ppl['window']} tokens, each fed {ppl['chunk']} tokens at a time "
            f"through the KV cache ({ppl['positions']} scored positions).",
            "",
            "| reference ppl | artifact ppl | increase | top-1 agreement | mean KL |",
            "|---|---|---|---|---|",
            f"| {ppl['reference_ppl']:.4f} | {ppl['artifact_ppl']:.4f} | {ppl['ppl_increase']:+.3%} | "
            f"{ppl['top1']:.2%} | {ppl['mean_kl']:.3g} |",
            "",
            f"Gate: increase <= {gate:.2%}." if gate is not None else "Perplexity is reported, not gated.",
        ]
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
        "Plots: `per_prompt.png` (mean KL per prompt and mode, with the gate), `per_position.png` (the "
        "distribution of per-position KL; top-1 agreement along the sequence), `per_layer.png` (layer "
        "errors).",
        "",
    ]
    return "\n".join(lines)
