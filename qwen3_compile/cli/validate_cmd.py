"""`qwen3-compile validate`: an artifact against the PyTorch reference, report and gates."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qwen3_compile.cli.common import (
    BACKEND_CHOICES,
    emit_json,
    layers_option,
    ort_ops_option,
    stage_command,
)

BUILTIN_PPL = "<built-in>"  # what `--ppl` alone means: the shipped held-out text


@click.command("validate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--reference", required=True, help="Preset name or checkpoint directory the artifact came from."
)
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default="ort",
    show_default=True,
    help="Runtime that runs ARTIFACT: ort (ONNX Runtime, CPU), ort-cuda (ONNX Runtime's CUDA provider, "
    "onnxruntime-gpu; KV cache kept on the GPU), tensorrt, tensorrt-rtx.",
)
@click.option(
    "--reference-device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where the PyTorch reference runs (fp32 either way; on cuda with TF32 off). A quantized artifact's "
    "recipe model stays on the CPU.",
)
@click.option(
    "--prompts", type=click.Path(path_type=Path), help="JSONL prompt file (default: the built-in suite)."
)
@click.option("--decode-steps", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--long-context-tokens",
    type=click.IntRange(min=0),
    help="Length of the long-context case (default: near the artifact's max positions, at most 8192; "
    "0 skips it).",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Report folder (default: ARTIFACT/validation)."
)
@click.option(
    "--ppl",
    "ppl_text",
    is_flag=False,
    flag_value=BUILTIN_PPL,
    type=click.Path(path_type=Path),
    help="Also measure perplexity (reference and artifact, relative increase, top-1, KL) on this UTF-8 text; "
    "`--ppl` alone uses the built-in held-out text (Python source, about 9.9K tokens).",
)
@click.option(
    "--ppl-window",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Tokens per perplexity window (each starts from an empty KV cache).",
)
@click.option("--ppl-windows", type=click.IntRange(min=1), help="Score at most this many windows.")
@click.option("--no-bisect", is_flag=True, help="Skip the per-layer bisection pass.")
@click.option("--force", is_flag=True, help="Replace an existing -o folder (ARTIFACT/validation always is).")
@ort_ops_option
@layers_option
@stage_command
def validate_command(
    artifact: Path,
    reference: str,
    backend: str,
    reference_device: str,
    prompts: Path | None,
    decode_steps: int,
    long_context_tokens: int | None,
    output: Path | None,
    no_bisect: bool,
    ppl_text: Path | None,
    ppl_window: int,
    ppl_windows: int | None,
    force: bool,
    layers: int | None,
    ort_ops: Path | None,
    as_json: bool,
) -> None:
    """Validate ARTIFACT against the PyTorch reference on the prompt suite in thinking and non-thinking mode:
    KL, top-1, cosine and max error per position, teacher-forced and free-running decode, a long-context case
    and layer bisection. Writes report.json, report.md and PNG plots; exit code 1 when a gate fails."""
    from qwen3_compile.backends.onnxruntime.op_libraries import selected_custom_ops
    from qwen3_compile.progress import default_progress
    from qwen3_compile.validate.perplexity import PerplexityRequest
    from qwen3_compile.validate.stage import validate_artifact

    ppl = None
    if ppl_text is not None:
        text = None if str(ppl_text) == BUILTIN_PPL else ppl_text
        ppl = PerplexityRequest(text, window=ppl_window, max_windows=ppl_windows)

    with selected_custom_ops(ort_ops, backend):
        report = validate_artifact(
            artifact,
            reference,
            num_layers=layers,
            backend=backend,
            prompts=prompts,
            decode_steps=decode_steps,
            long_context_tokens=long_context_tokens,
            output=output,
            bisect=not no_bisect,
            perplexity=ppl,
            force=force,
            reference_device=reference_device,
            progress=default_progress(not as_json),
        )
    if as_json:
        emit_json(report.to_dict() | {"directory": str(report.directory)})
    else:
        p, d = report.summary("prefill"), report.summary("decode")
        click.echo(
            f"{'PASS' if report.passed else 'FAIL'} ({report.gates_source}): prefill mean KL "
            f"{p.mean_kl:.3g}, top-1 {p.top1:.2%}; decode mean KL {d.mean_kl:.3g}, top-1 "
            f"{d.top1:.2%}; greedy match {report.greedy_match_fraction:.1%}; modes {', '.join(report.modes)}"
        )
        if report.perplexity is not None:
            q = report.perplexity
            click.echo(
                f"perplexity {q.reference_ppl:.4g} -> {q.artifact_ppl:.4g} ({q.ppl_increase:+.2%}), top-1 "
                f"{q.top1:.2%}, mean KL {q.mean_kl:.3g} over {q.positions} positions"
            )
        for failure in report.failures:
            click.echo(f"  - {failure}")
        click.echo(f"report: {report.directory / 'report.md'}")
    if not report.passed:
        sys.exit(1)
