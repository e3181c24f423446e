"""`qwen3-compile inspect`: what a model is, its size per precision, where it fits."""

from __future__ import annotations

import click

from qwen3_compile.cli.common import emit_json, stage_command


@click.command("inspect")
@click.argument("model", required=False)
@click.option("--layers", type=click.IntRange(min=1), help="Presets only: instantiate with this many layers.")
@click.option(
    "--context",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Context length (tokens) for the KV-cache and target-fit estimates.",
)
@click.option("--quick", is_flag=True, help="Checkpoints: validate headers only, skip reading weight values.")
@click.option("--allow-nonfinite", is_flag=True, help="Report NaN/Inf weights instead of refusing them.")
@click.option("--list", "list_presets", is_flag=True, help="List the presets and exit.")
@stage_command
def inspect_command(
    model: str | None,
    layers: int | None,
    context: int,
    quick: bool,
    allow_nonfinite: bool,
    list_presets: bool,
    as_json: bool,
) -> None:
    """Summarise MODEL: architecture, parameters, weight memory per precision, KV cache, target fit."""
    from qwen3_compile.models.presets import DEFAULT_PRESET, get_preset, preset_names
    from qwen3_compile.progress import default_progress
    from qwen3_compile.rendering import render_inspect

    if list_presets:
        presets = [get_preset(n) for n in preset_names()]
        if as_json:
            emit_json({p.name: p.description for p in presets})
        else:
            for p in presets:
                click.echo(f"{p.name:32s} {p.description}")
        return
    from qwen3_compile.inspection import inspect_model

    report = inspect_model(
        model or DEFAULT_PRESET,
        num_layers=layers,
        context=context,
        verify_weights=not quick,
        allow_nonfinite=allow_nonfinite,
        progress=default_progress(not as_json),
    )
    if as_json:
        emit_json(report.to_dict())
    else:
        render_inspect(report)
