"""`qwen3-compile build`: an exported or quantized artifact -> a TensorRT / TensorRT-RTX plan for a target."""

from __future__ import annotations

from pathlib import Path

import click

from qwen3_compile.cli.common import emit_json, stage_command, target_option


@click.command("build")
@click.argument("artifact", type=click.Path(path_type=Path))
@target_option(required=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-seq", type=click.IntRange(min=2), help="Context (default: max positions, <= 4096).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option(
    "--moe-lowering",
    type=click.Choice(["trt_moe", "plugin", "dense"]),
    help="Override the target's MoE lowering order (MoE models only).",
)
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A TensorRT plugin library to load before parsing (repeatable); hashed into the manifest.",
)
@click.option(
    "--logits",
    type=click.Choice(["all", "last"]),
    default="all",
    show_default=True,
    help="all: every position's logits (what validate compares); last: deployment, the newest token only.",
)
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache file (read and updated).")
@click.option("--opt-level", type=click.IntRange(0, 5), help="TensorRT builder optimisation level.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@stage_command
def build_command(
    artifact: Path,
    target: str,
    max_batch: int,
    max_seq: int | None,
    output: Path,
    moe_lowering: str | None,
    plugins: tuple[Path, ...],
    logits: str,
    timing_cache: Path | None,
    opt_level: int | None,
    force: bool,
    as_json: bool,
) -> None:
    """Build a TensorRT plan of ARTIFACT (an `export` or `quantize` folder) for a deployment target: the
    recipe/target check and the memory fit (weights + KV cache at --max-batch x --max-seq + activations)
    before anything is built, the target's MoE lowering, a strongly typed network with prefill and decode
    optimisation profiles, the plan written atomically with build.log and manifest.json.

    RTX targets build with TensorRT-RTX (pip install 'qwen3-compile[rtx]'; no GPU needed to build);
    Jetson, H100/H200 and DGX Spark targets need standard TensorRT on the build machine."""
    from qwen3_compile.engine import BuildOptions, build_engine
    from qwen3_compile.progress import default_progress

    options = BuildOptions(
        target=target,
        max_batch=max_batch,
        max_seq=max_seq,
        moe_lowering=moe_lowering,
        plugins=plugins,
        timing_cache=timing_cache,
        optimization_level=opt_level,
        logits=logits,
    )
    from qwen3_compile.schema import encode

    result = build_engine(artifact, options, output, force=force, progress=default_progress(not as_json))
    manifest = result.manifest
    if as_json:
        emit_json(
            {
                "directory": str(result.directory),
                "plan": str(result.plan_path),
                "bytes": result.plan_bytes,
                "build_s": result.build_seconds,
                "target": encode(manifest.target),
                "tensorrt": encode(manifest.tensorrt),
                "moe": encode(manifest.moe),
                "memory": encode(manifest.memory),
            }
        )
        return
    trt = manifest.tensorrt
    click.echo(
        f"wrote {result.plan_path}: {result.plan_bytes / 1e6:.1f} MB for {manifest.target.name} "
        f"(SM {manifest.target.sm}) with {trt.module} {trt.version} "
        f"in {result.build_seconds:.1f} s; "
        f"MoE lowering: {result.moe_lowering}; build log: {result.directory / 'build.log'}"
    )
