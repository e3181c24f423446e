"""`qwen3-compile compile`: the whole pipeline on one model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qwen3_compile.cli.common import emit_json, layers_option, stage_command, target_option
from qwen3_compile.errors import BadInputError


def _recipe_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


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
@target_option(
    help="Search mode: keep the smallest artifact that runs on this device and passes its recipe's gates "
    "(see below)."
)
@click.option(
    "--recipes",
    callback=_recipe_list,
    help="With --target: consider only these built-in recipes (comma-separated; default: all).",
)
@click.option(
    "--group-size",
    type=click.IntRange(min=16),
    help="With --target: the INT4 recipes' group size (e.g. 32 for 32-wide models).",
)
@click.option(
    "--ppl-windows",
    type=click.IntRange(min=1),
    help="With --target: score at most this many perplexity windows of the built-in text (default: all).",
)
@stage_command
def compile_command(
    model: str | None,
    output_root: Path,
    decode_steps: int,
    long_context_tokens: int | None,
    layers: int | None,
    target: str | None,
    recipes: list[str] | None,
    group_size: int | None,
    ppl_windows: int | None,
    as_json: bool,
) -> None:
    """The whole pipeline on MODEL (default: the embedded tiny-moe preset): export, ONNX Runtime lowering,
    parity of both graphs against PyTorch, and validation of the ONNX Runtime graph on the prompt suite in
    thinking and non-thinking mode. Exit code 1 when parity or a validation gate fails.

    With --target DEVICE: the recipes the device can run and whose memory plan fits it, smallest weights
    first (the fp16 baseline last), are quantized and validated (both reasoning modes and perplexity on the
    built-in held-out text, against each recipe's gates) until one passes; that one is kept, lowered for
    ONNX Runtime, built into an engine when the device's TensorRT is installed and bundled for Jetsons.
    Rejected attempts keep only their validation reports (<model>/attempts/). Exit code 1 when none passes.
    """
    from qwen3_compile.models.presets import DEFAULT_PRESET
    from qwen3_compile.pipeline import compile_model
    from qwen3_compile.progress import default_progress
    from qwen3_compile.rendering import render_compile

    if target is not None:
        _compile_for_target(
            model or DEFAULT_PRESET,
            target,
            output_root,
            recipes,
            group_size,
            layers,
            decode_steps,
            long_context_tokens,
            ppl_windows,
            as_json,
        )
        return
    for option, value in (
        ("--recipes", recipes),
        ("--group-size", group_size),
        ("--ppl-windows", ppl_windows),
    ):
        if value is not None:
            raise BadInputError(
                f"{option} applies to the search for a device.", field=option, fix="add --target DEVICE."
            )
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


def _compile_for_target(
    model: str,
    target: str,
    output_root: Path,
    recipes: list[str] | None,
    group_size: int | None,
    layers: int | None,
    decode_steps: int,
    long_context_tokens: int | None,
    ppl_windows: int | None,
    as_json: bool,
) -> None:
    from qwen3_compile.compile_target import compile_for_target
    from qwen3_compile.progress import default_progress
    from qwen3_compile.rendering import render_target_compile

    result = compile_for_target(
        model,
        target,
        output_root,
        recipes=recipes,
        group_size=group_size,
        num_layers=layers,
        decode_steps=decode_steps,
        long_context_tokens=long_context_tokens or 0,
        ppl_windows=ppl_windows,
        progress=default_progress(not as_json),
    )
    if as_json:
        emit_json(result.to_dict())
    else:
        render_target_compile(result)
    if not result.passed:
        sys.exit(1)
