"""Human-readable rendering of stage results (rich tables on stdout). Machines use `--json`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwen3_compile.inspection import ModelReport
from qwen3_compile.sizing import GB

if TYPE_CHECKING:
    from qwen3_compile.compile_target import TargetCompileResult
    from qwen3_compile.pipeline import CompileResult


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def render_inspect(report: ModelReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    a = report.architecture
    kind = "MoE" if a["num_experts"] else "dense"
    console.print(f"[bold]{report.model}[/bold] ({report.kind}, Qwen3 {kind})")
    arch = Table(show_header=False, box=None, padding=(0, 2))
    arch.add_row("layers / hidden", f"{a['num_layers']} / {a['hidden_size']}")
    arch.add_row("heads q / kv x head_dim", f"{a['num_heads']} / {a['num_kv_heads']} x {a['head_dim']}")
    if a["num_experts"]:
        arch.add_row(
            "experts",
            f"{a['num_experts']} (top-{a['top_k']}, moe_intermediate "
            f"{a['moe_intermediate_size']}, norm_topk_prob={a['norm_topk_prob']})",
        )
    else:
        arch.add_row("intermediate", str(a["intermediate_size"]))
    arch.add_row("vocab / tied embeddings", f"{a['vocab_size']} / {a['tie_word_embeddings']}")
    arch.add_row("rope_theta / max positions", f"{a['rope_theta']:g} / {a['max_position_embeddings']}")
    p = report.parameters
    published = report.published or {}
    pub = lambda key: f" (published {published[key]}B)" if published.get(key) else ""  # noqa: E731
    arch.add_row(
        "parameters",
        f"{_b(p.total)} total{pub('total')}, {_b(p.active)} active{pub('active')}, "
        f"{_b(p.non_embedding)} non-embedding{pub('non_embedding')}",
    )
    kv = report.kv_bytes_per_token
    arch.add_row(
        "KV cache per token",
        f"{kv['fp16'] / 1024:.1f} KiB fp16, {kv['fp8'] / 1024:.1f} KiB fp8 "
        f"({kv['fp16'] * report.context / GB:.2f} GB fp16 at {report.context} "
        f"tokens)",
    )
    arch.add_row("weights", ", ".join(f"{k} {v:.2f} GB" for k, v in report.weight_gb.items()))
    if report.checkpoint:
        c = report.checkpoint
        checked = (
            "not read (--quick)"
            if c.nonfinite_tensors is None
            else ("all finite" if not c.nonfinite_tensors else f"{len(c.nonfinite_tensors)} with NaN/Inf")
        )
        arch.add_row(
            "checkpoint",
            f"{c.files} file(s), {'/'.join(c.dtypes)}, {c.bytes_on_disk / GB:.2f} GB, "
            f"experts {c.expert_layout}, values {checked}",
        )
        if c.quantization:
            q = c.quantization
            arch.add_row(
                "quantization",
                f"{q['label']} ({q['method']}): {q['quantized_linears']} linears stored quantized, "
                f"{q['stored_bytes'] / 1e6:.2f} MB against {q['bf16_bytes'] / 1e6:.2f} MB in bf16; "
                f"modules {', '.join(q['quantized_modules'])}",
            )
    arch.add_row("tokenizer", report.tokenizer_dir)
    console.print(arch)

    fits = Table(
        title=f"Target fit: weights + KV cache (past + present) at {report.context} tokens + activations",
        caption="GB left free (+) or missing (-) after the target's reserved memory; "
        "n/a: the target cannot run that precision",
    )
    fits.add_column("target")
    fits.add_column("SM")
    fits.add_column("memory")
    precisions = list(report.weight_gb)  # an imported checkpoint: its own precision only
    stored = report.checkpoint.quantization if report.checkpoint else None
    for precision in precisions:
        fits.add_column(f"{stored['label']}, as stored" if stored else precision, justify="right")
    for fit in report.fits:
        cells = []
        for precision in precisions:
            free = fit.headroom_gb[precision]
            cells.append(
                "n/a" if free is None else f"[green]{free:+.1f}" if free >= 0 else f"[red]{free:+.1f}"
            )
        fits.add_row(fit.target.name, fit.target.sm, f"{fit.target.memory_gb:g} GB", *cells)
    console.print(fits)


def render_compile(result: CompileResult) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from qwen3_compile.environment import environment

    console = Console()
    table = Table(title=f"Parity against PyTorch (fp32), {result.directory}")
    for column in ("graph", "MoE node", "prefill |err|", "top-1", "decode |err|", "greedy =", "result"):
        table.add_column(column)
    for key, artifact in result.artifacts.items():
        p = result.parity[key]
        moe = next(
            (op.split("::")[-1] for op in artifact.op_histogram if op.endswith(("ExpertDispatch", "::MoE"))),
            "-",
        )
        verdict = "[green]pass" if p.passed else "[red]FAIL: " + "; ".join(p.failures)
        table.add_row(
            key,
            moe,
            f"{p.prefill_max_abs:.2e}",
            f"{p.prefill_top1:.2%}",
            f"{p.decode_max_abs:.2e}",
            f"{p.greedy_identical}/{p.sequences}",
            verdict,
        )
    console.print(table)
    first = next(iter(result.parity.values()))
    console.print(
        f"{first.sequences} prompts in {' and '.join(first.modes)} mode (Qwen3 chat template, one "
        f"left-padded batch, {first.prefill_positions} prefill positions), {first.decode_steps} greedy "
        "decode steps."
    )
    env = environment()
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if k != "qwen3-compile")
    console.print(f"Computed with {packages} on {env['processor']} ({env['machine']}).")
    for key, artifact in result.artifacts.items():
        console.print(f"{key:>10}: {artifact.model_path}")
    v = result.validation
    console.print(
        f"validation ({v.gates_source}): "
        f"{'[green]pass' if v.passed else '[red]FAIL: ' + '; '.join(v.failures)}[/] on {len(v.cases)} "
        f"prompts, report {v.directory / 'report.md'}"
    )
    q, qv = result.quantized, result.quantized_validation
    if q is None:
        console.print("  quantize: skipped: a published quantized checkpoint keeps its own weights")
    else:
        console.print(
            f"{q.recipe.name:>10}: {q.directory / 'model.onnx'} ({q.weight_ratio:.2f}x of fp16 for the "
            f"quantized weights, calibrated on {q.manifest.calibration['tokens']} tokens); "
            f"validation ({qv.gates_source}): "
            f"{'[green]pass' if qv.passed else '[red]FAIL: ' + '; '.join(qv.failures)}[/], mean KL "
            f"{qv.summary('prefill').mean_kl:.4f}, top-1 {qv.summary('prefill').top1:.2%}"
        )
    e = result.engine
    if "skipped" in e:
        console.print(f"    engine: skipped: {escape(e['skipped'])}")  # keeps "[rtx]" from being markup
    else:
        console.print(
            f"    engine: {e['path']} ({e['bytes'] / 1e6:.1f} MB, {e['target']}, built in "
            f"{e['build_s']:.1f} s, MoE lowering {e['moe_lowering']}; built, not executed)"
        )
    console.print(f"   summary: {result.directory / 'compile.json'}")


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _gate(value: float | None, gate: float | None, fmt: str, sign: str) -> str:
    """'0.0012 <= 0.02': the value and the gate it is held to."""
    if value is None:
        return "-"
    return f"{value:{fmt}} {sign} {gate:{fmt}}" if gate is not None else f"{value:{fmt}} (no gate)"


def render_target_compile(result: TargetCompileResult) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    t = result.target
    table = Table(
        title=f"{result.model} for {t.name} ({t.description}), smallest first",
        caption=f"memory: weights + KV cache (past + present) + activations at {result.context} tokens, "
        f"against {t.usable_gb:g} GB usable; gates: the recipe's",
        show_edge=False,  # two more columns of room in an 80-column terminal
    )
    for column in ("recipe", "weights", "memory GB", "mean KL", "top-1", "ppl increase"):
        recipe = column == "recipe"
        table.add_column(  # gate cells may wrap: in a narrow terminal the recipe keeps its name
            column,
            justify="left" if recipe else "right",
            no_wrap=column in ("weights", "memory GB"),
            min_width=12 if recipe else None,
        )
    table.add_column("decision", ratio=1)
    colours = {"kept": "green", "rejected": "red", "not applicable": "yellow"}
    for a in result.attempts:
        g = a.gates
        decision = a.decision + (f": {a.reason}" if a.reason else "")
        colour = colours.get(a.decision)
        table.add_row(
            a.applied,
            _size(a.weight_bytes),
            f"{a.needed_gb:.3f}/{a.usable_gb:g}",
            _gate(g.mean_kl, g.max_mean_kl, ".4f", "<=") if g else "-",
            _gate(g.top1, g.min_top1, ".1%", ">=") if g else "-",
            _gate(g.ppl_increase, g.max_ppl_increase, "+.2%", "<=") if g else "-",
            f"[{colour}]{escape(decision)}[/]" if colour else escape(decision),
        )
    console.print(table)
    kept = result.kept
    if kept is None:
        console.print(
            "[red]no candidate passed[/]; reports under " + escape(str(result.directory / "attempts"))
        )
    else:
        console.print(f"kept: {escape(kept.artifact)} ({kept.applied}, report {escape(kept.gates.report)})")
    for label, part in (("ort", result.lowered), ("engine", result.engine), ("bundle", result.bundle)):
        if part is None:
            continue
        if "skipped" in part:
            console.print(f"{label:>7}: skipped: {escape(part['skipped'])}")
        elif label == "engine":
            console.print(
                f"{label:>7}: {escape(part['path'])} ({part['bytes'] / 1e6:.1f} MB, built in "
                f"{part['build_s']:.1f} s, MoE lowering {part['moe_lowering']}; built, not executed)"
            )
        elif label == "bundle":
            console.print(
                f"{label:>7}: {escape(part['path'])} ({part['bytes'] / 1e6:.1f} MB; the engine is built on "
                "the device)"
            )
        else:
            console.print(f"{label:>7}: {escape(part['path'])}")
    console.print(f"result: {escape(str(result.directory / 'compile.json'))}")
