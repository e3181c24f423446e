"""The `qwen3-compile` command line: thin Click commands over the library's stages.

Each command parses options, calls one library function and renders its result (a table for people,
`--json` for machines). Exit codes: 0 ok, 1 a check failed, 2 bad input.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

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


def _model_option_layers(fn: Callable) -> Callable:
    return click.option(
        "--layers",
        type=click.IntRange(min=1),
        help="Presets only: instantiate with this many layers at full width.",
    )(fn)


@main.command("export")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=21, show_default=True, help="Default-domain ONNX opset (18-24).")
@click.option(
    "--max-positions",
    type=click.IntRange(min=1),
    help="Context limit recorded in the artifact (default: the model's).",
)
@click.option(
    "--target",
    type=click.Choice(["ort"]),
    help="Lower the canonical graph for a backend (ort: ExpertDispatch -> com.microsoft::MoE).",
)
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--allow-nonfinite", is_flag=True, help="Export weights containing NaN/Inf.")
@_model_option_layers
@stage_command
def export_command(
    model: str,
    output: Path,
    dtype: str,
    opset: int,
    max_positions: int | None,
    target: str | None,
    force: bool,
    allow_nonfinite: bool,
    layers: int | None,
    as_json: bool,
) -> None:
    """Export MODEL to ONNX: OUTPUT/model.onnx, side files (config, tokenizer) and manifest.json."""
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.progress import default_progress

    artifact = export_onnx(
        model,
        output,
        ExportOptions(dtype, opset, max_positions, target),
        num_layers=layers,
        force=force,
        allow_nonfinite=allow_nonfinite,
        progress=default_progress(not as_json),
    )
    if as_json:
        emit_json(
            {
                "directory": str(artifact.directory),
                "model": str(artifact.model_path),
                "op_histogram": artifact.op_histogram,
                "lowering": artifact.lowering,
                "timings_s": artifact.manifest["timings_s"],
            }
        )
        return
    nodes = sum(artifact.op_histogram.values())
    click.echo(
        f"wrote {artifact.model_path} ({nodes} nodes, {dtype}, opset {opset}"
        f"{', lowered for ' + target if target else ''})"
    )


@main.command("compile")
@click.argument("model", required=False)
@click.option(
    "-o",
    "--output-root",
    type=click.Path(path_type=Path),
    default=Path("artifacts"),
    show_default=True,
    help="Folder that receives <model>/ with every stage's artifacts (an earlier run there is replaced).",
)
@click.option("--decode-steps", type=click.IntRange(min=1), default=32, show_default=True)
@_model_option_layers
@stage_command
def compile_command(
    model: str | None, output_root: Path, decode_steps: int, layers: int | None, as_json: bool
) -> None:
    """The whole pipeline on MODEL (default: the embedded tiny-moe preset): export, ONNX Runtime lowering,
    parity against PyTorch in thinking and non-thinking mode. Exit code 1 when parity fails."""
    from qwen3_compile.models.presets import DEFAULT_PRESET
    from qwen3_compile.pipeline import compile_model
    from qwen3_compile.progress import default_progress
    from qwen3_compile.rendering import render_compile

    result = compile_model(
        model or DEFAULT_PRESET,
        output_root,
        num_layers=layers,
        decode_steps=decode_steps,
        progress=default_progress(not as_json),
    )
    if as_json:
        emit_json(result.to_dict())
    else:
        render_compile(result)
    if not result.passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
