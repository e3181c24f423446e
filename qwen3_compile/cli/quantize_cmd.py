"""`qwen3-compile quantize`: an exported artifact + a recipe -> a QDQ artifact."""

from __future__ import annotations

from pathlib import Path

import click

from qwen3_compile.cli.common import emit_json, stage_command, target_option


@click.command("quantize")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--recipe",
    required=True,
    help="A built-in recipe (fp16, int8-wo, int8-sq, fp8, int4-rtn, int4-awq) or a recipe .toml file.",
)
@click.option(
    "--calibration",
    "--calib",
    "calib",
    type=click.Path(path_type=Path),
    help='Calibration text from your domain: .jsonl (one object a line: {"text": ...} or {"messages": '
    "[...]}) or plain text (paragraphs separated by blank lines); default: the built-in chat set. Calibrated "
    "recipes (int8-sq, fp8, int4-awq, --kv-cache) pick their ranges and scales on it.",
)
@click.option("--samples", type=click.IntRange(min=1), help="Calibration sequences (default: the recipe's).")
@click.option(
    "--kv-cache", type=click.Choice(["fp8"]), help="Quantize the KV cache (E4M3, calibrated scales)."
)
@click.option(
    "--group-size",
    type=int,
    help="Input channels per scale for per-group (INT4) recipes, instead of the recipe's (e.g. 32 for the "
    "64-wide tiny presets).",
)
@click.option(
    "--lm-head",
    type=click.Choice(["float", "int8", "int4"]),
    help="Quantize the output projection too (weight-only INT8/INT4 recipes; int4 needs an INT4 recipe's "
    "groups), instead of the recipe's `weights.lm_head` (float by default). Tied embeddings: a quantized "
    "copy projects, the embedding gather stays float.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output directory.")
@target_option(help="Deployment device the recipe must run on (checked before any work).")
@click.option(
    "--ort-qdq",
    type=click.Choice(["reference", "fused"]),
    default="reference",
    show_default=True,
    help="How ONNX Runtime runs the QDQ graph, recorded in the manifest (validate and run follow it): "
    "reference runs it as written (the recipe's numbers; weights held in float); fused keeps INT8 weights "
    "int8 in memory through ORT's fusions, which also quantize weight-only MatMuls' activations.",
)
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@stage_command
def quantize_command(
    artifact: Path,
    recipe: str,
    calib: Path | None,
    samples: int | None,
    kv_cache: str | None,
    group_size: int | None,
    lm_head: str | None,
    output: Path,
    target: str | None,
    ort_qdq: str,
    force: bool,
    as_json: bool,
) -> None:
    """Quantize an exported ARTIFACT with RECIPE: symmetric Q/DQ in TensorRT's explicit-quantization form
    (weights per output channel, per expert for MoE, or INT4 per group of input channels; W8A8 recipes
    add static per-tensor activation scales calibrated layer by layer, SmoothQuant folded into the
    RMSNorms). The recipe, its accuracy
    gates and the calibration summary go into manifest.json (`validate` enforces the gates)."""
    from qwen3_compile.progress import default_progress
    from qwen3_compile.quantize.recipe import load_recipe, with_group_size, with_kv_cache, with_lm_head
    from qwen3_compile.quantize.stage import quantize_artifact
    from qwen3_compile.schema import encode

    chosen = load_recipe(recipe)
    if group_size is not None:
        chosen = with_group_size(chosen, group_size)
    if lm_head is not None:
        chosen = with_lm_head(chosen, lm_head)
    if kv_cache:
        chosen = with_kv_cache(chosen, kv_cache)
    result = quantize_artifact(
        artifact,
        chosen,
        output,
        force=force,
        target=target,
        calib=calib,
        samples=samples,
        progress=default_progress(not as_json),
        ort_qdq=ort_qdq,
    )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    stats = result.manifest.quantization
    if as_json:
        emit_json(
            {
                "directory": str(result.directory),
                "recipe": result.recipe.to_dict(),
                **encode(stats),
                "weight_ratio_vs_fp16": result.weight_ratio,
                "calibration": result.manifest.calibration,
                "warnings": result.warnings,
            }
        )
        return
    click.echo(
        f"wrote {result.directory / 'model.onnx'}: recipe {result.recipe.name}, "
        f"{stats.quantized_tensors} weight tensors quantized, {stats.float_bytes / 1e6:.1f} MB fp32 -> "
        f"{stats.quantized_bytes / 1e6:.1f} MB ({result.weight_ratio:.2f}x of fp16)"
    )
