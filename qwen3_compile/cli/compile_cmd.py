"""`qwen3-compile compile`: the whole pipeline on one model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qwen3_compile.cli.common import emit_json, layers_option, stage_command


@click.command("compile")
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
@click.option(
    "--long-context-tokens",
    type=click.IntRange(min=0),
    help="Validation's long-context case (default: near the model's max positions, at most 8192).",
)
@layers_option
@stage_command
def compile_command(
    model: str | None,
    output_root: Path,
    decode_steps: int,
    long_context_tokens: int | None,
    layers: int | None,
    as_json: bool,
) -> None:
    """The whole pipeline on MODEL (default: the embedded tiny-moe preset): export, ONNX Runtime lowering,
    parity of both graphs against PyTorch, and validation of the ONNX Runtime graph on the prompt suite in
    thinking and non-thinking mode. Exit code 1 when parity or a validation gate fails."""
    from qwen3_compile.models.presets import DEFAULT_PRESET
    from qwen3_compile.pipeline import compile_model
    from qwen3_compile.progress import default_progress
    from qwen3_compile.rendering import render_compile

    result = compile_model(
        model or DEFAULT_PRESET,
        output_root,
        num_layers=layers,
        decode_steps=decode_steps,
        long_context_tokens=long_context_tokens,
        progress=default_progress(not as_json),
    )
    if as_json:
        emit_json(result.to_dict())
    else:
        render_compile(result)
    if not result.passed:
        sys.exit(1)
