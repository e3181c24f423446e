"""`qwen3-compile lower`: an export or quantize folder rewritten for one runtime (and device)."""

from __future__ import annotations

from pathlib import Path

import click

from qwen3_compile.cli.common import emit_json, stage_command, target_option


@click.command("lower")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--for",
    "runtime",
    type=click.Choice(["ort", "tensorrt"]),
    required=True,
    help="The runtime: ort (ONNX Runtime's MoE/QMoE ops) or tensorrt (the target's MoE lowering).",
)
@target_option(help="Deployment device (required with --for tensorrt: it picks the MoE lowering).")
@click.option(
    "--moe-lowering",
    type=click.Choice(["trt_moe", "plugin", "dense", "ort-moe", "custom-op"]),
    help="TensorRT: override the target's MoE lowering order (trt_moe, plugin, dense). ONNX Runtime: ort-moe "
    "(its MoE/QMoE operators, the default; named explicitly it also lowers fp16 experts, which only ORT's "
    "CUDA provider runs) or custom-op (ExpertDispatch, and WeightOnlyExpertDispatch for INT8/INT4 experts, "
    "for --ort-ops libqmoe_ort.so).",
)
@click.option(
    "--attention",
    type=click.Choice(["standard", "gqa"]),
    default="standard",
    show_default=True,
    help="ONNX Runtime: standard (attention as exported) or gqa (one com.microsoft::GroupQueryAttention per "
    "layer; takes unpadded or right-padded batches, and a static KV cache: docs/gpu.md).",
)
@click.option(
    "--logits",
    type=click.Choice(["all", "last"]),
    default="all",
    show_default=True,
    help="all: logits for every position (what validate compares); last: the last position's only, a "
    "deployment graph for `run` (no prompt-length logits to compute or copy; validate refuses it).",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@stage_command
def lower_command(
    artifact: Path,
    runtime: str,
    target: str | None,
    moe_lowering: str | None,
    attention: str,
    logits: str,
    output: Path,
    force: bool,
    as_json: bool,
) -> None:
    """Rewrite ARTIFACT (an `export` or `quantize` folder) for one runtime into OUTPUT, with a manifest.

    --for ort: ExpertDispatch -> com.microsoft::MoE, INT8 weight-only experts -> QMoE (nodes a rule
    declines keep their reference body; the reasons are reported); --attention gqa also turns each layer's
    attention into one GroupQueryAttention node. --for tensorrt --target DEVICE: the
    device's MoE lowering (TRT_MoE, the plugin, or dense experts). `validate` and `run` take the result."""
    from qwen3_compile.lower.stage import lower_artifact
    from qwen3_compile.progress import default_progress

    result = lower_artifact(
        artifact,
        output,
        runtime,
        target=target,
        moe_lowering=moe_lowering,
        attention=attention,
        logits=logits,
        force=force,
        progress=default_progress(not as_json),
    )
    if as_json:
        emit_json(
            {
                "directory": str(result.directory),
                "for": result.runtime,
                "target": result.target,
                "applied": result.report.applied,
                "declined": result.report.declined,
                "moe_lowering": result.moe.lowering if result.moe else None,
                "attention": attention,
                "logits": logits,
                "op_histogram": result.op_histogram,
            }
        )
        return
    applied = ", ".join(f"{rule} x{n}" for rule, n in result.report.applied.items()) or "no rewrite"
    click.echo(
        f"wrote {result.model_path} (lowered for {runtime}{' / ' + target if target else ''}: {applied})"
    )
    for rule, reasons in result.report.declined.items():
        for reason in reasons:
            click.echo(f"  {rule} declined {reason}", err=True)
