"""`qwen3-compile export`: MODEL to an ONNX artifact folder."""

from __future__ import annotations

from pathlib import Path

import click

from qwen3_compile.cli.common import emit_json, layers_option, removed_option, stage_command


@click.command("export")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=21, show_default=True, help="Default-domain ONNX opset (18-24).")
@click.option(
    "--max-positions",
    type=click.IntRange(min=1),
    help="Context limit recorded in the artifact (default: the model's).",
)
@removed_option(
    "--target",
    "export writes the canonical graph; `qwen3-compile lower EXPORT_DIR --for ort -o DIR` lowers it for "
    "ONNX Runtime.",
)
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--allow-nonfinite", is_flag=True, help="Export weights containing NaN/Inf.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted large export after its last finished layer (same MODEL and options).",
)
@layers_option
@stage_command
def export_command(
    model: str,
    output: Path,
    dtype: str,
    opset: int,
    max_positions: int | None,
    force: bool,
    allow_nonfinite: bool,
    resume: bool,
    layers: int | None,
    as_json: bool,
) -> None:
    """Export MODEL to ONNX: OUTPUT/model.onnx, side files (config, tokenizer) and manifest.json.

    Weights stream from the checkpoint layer by layer (memory for one layer, not the model). A large
    export builds in .OUTPUT.partial with a journal; after an interruption rerun it with --resume."""
    import sys

    from qwen3_compile.export.resume import JOURNAL_FILE, partial_dir
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.progress import NO_PROGRESS, LineProgress, default_progress

    progress = default_progress() if sys.stderr.isatty() else LineProgress()

    try:
        artifact = export_onnx(
            model,
            output,
            ExportOptions(dtype, opset, max_positions),
            num_layers=layers,
            force=force,
            allow_nonfinite=allow_nonfinite,
            progress=NO_PROGRESS if as_json else progress,
            resume=resume,
        )
    except KeyboardInterrupt:
        if (partial_dir(output) / JOURNAL_FILE).exists():
            click.echo(f"finished layers kept in {partial_dir(output)}: rerun with --resume.", err=True)
        raise
    if as_json:
        emit_json(
            {
                "directory": str(artifact.directory),
                "model": str(artifact.model_path),
                "op_histogram": artifact.op_histogram,
                "timings_s": artifact.manifest.timings_s,
            }
        )
        return
    nodes = sum(artifact.op_histogram.values())
    click.echo(f"wrote {artifact.model_path} ({nodes} nodes, {dtype}, opset {opset})")
