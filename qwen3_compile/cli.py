"""The `qwen3-compile` command line: thin Click commands over the library's stages.

Each command parses options, calls one library function and renders its result (a table for people,
`--json` for machines). Exit codes: 0 ok, 1 a check failed, 2 bad input.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable

import click

from qwen3_compile import __version__
from qwen3_compile.errors import Qwen3CompileError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def stage_command(fn: Callable) -> Callable:
    """Adds --json and --debug, and turns library errors into a message and an exit code."""

    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args, as_json: bool, debug: bool, **kwargs):
        try:
            return fn(*args, as_json=as_json, **kwargs)
        except Qwen3CompileError as err:
            if debug:
                raise
            _fail(err.message, err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted.", 130)

    return wrapper


def emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="qwen3-compile")
def main() -> None:
    """Compile Qwen3 dense and MoE checkpoints into validated ONNX / TensorRT deployment artifacts.

    MODEL is a preset name (see `qwen3-compile inspect --list`) or a local Hugging Face checkpoint
    directory (config.json + safetensors).
    """


@main.command("inspect")
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


if __name__ == "__main__":
    main()
