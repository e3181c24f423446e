"""`qwen3-compile quantize`: an exported artifact + a recipe -> a QDQ artifact."""

from __future__ import annotations

from pathlib import Path

import click

from qwen3_compile.cli.common import emit_json, stage_command


@click.command("quantize")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--recipe", required=True, help="A built-in recipe name (int8-wo) or a recipe .toml file.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option(
    "--target",
    type=click.Choice(["ort"]),
    help="Lower the quantized graph for a backend (ort: INT8 experts -> com.microsoft::QMoE).",
)
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@stage_command
def quantize_command(
    artifact: Path, recipe: str, output: Path, target: str | None, force: bool, as_json: bool
) -> None:
    """Quantize an exported ARTIFACT with RECIPE: symmetric INT8 weights per output channel (per expert
    for MoE) behind DequantizeLinear, the recipe and its accuracy gates recorded in manifest.json
    (`validate` enforces them)."""
    from qwen3_compile.quantize.stage import quantize_artifact

    result = quantize_artifact(artifact, recipe, output, force=force, target=target)
    stats = result.manifest["quantization"]
    if as_json:
        emit_json(
            {
                "directory": str(result.directory),
                "recipe": result.recipe.to_dict(),
                **stats,
                "weight_ratio_vs_fp16": result.weight_ratio,
            }
        )
        return
    click.echo(
        f"wrote {result.directory / 'model.onnx'}: recipe {result.recipe.name}, "
        f"{stats['quantized_tensors']} weight tensors quantized, {stats['float_bytes'] / 1e6:.1f} MB fp32 -> "
        f"{stats['quantized_bytes'] / 1e6:.1f} MB ({result.weight_ratio:.2f}x of fp16)"
    )
