"""`qwen3-compile bundle` and `verify-bundle`: a validated artifact -> a Jetson bundle, and its check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from qwen3_compile.bundle.device.bundle_files import MAX_FILE_BYTES, MAX_FILES, MAX_TOTAL_BYTES, parse_size
from qwen3_compile.bundle.jetson import JETSON_TARGETS
from qwen3_compile.cli.common import emit_json, stage_command, target_option


@click.command("bundle")
@click.argument("artifact", type=click.Path(path_type=Path))
@target_option(required=True, only=JETSON_TARGETS, help="The Jetson to deploy on.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="FILE.tar.gz to write.")
@click.option("--max-seq", type=click.IntRange(min=2), help="Context of the engine (default: <= 4096).")
@click.option(
    "--smoke-tokens",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Greedy tokens of the artifact on ONNX Runtime to record for the smoke test (0: none; large MoE).",
)
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@stage_command
def bundle_command(
    artifact: Path,
    target: str,
    output: Path,
    max_seq: int | None,
    smoke_tokens: int,
    force: bool,
    as_json: bool,
) -> None:
    """Bundle ARTIFACT (an `export` or `quantize` folder that passed `validate`) for a Jetson: the graph
    lowered for the target with its weights, the MoE plugin sources and CMake when the graph uses the
    plugin, an engine build script and a runner for the device, the tokenizer and config, the validation
    report and a manifest with every file's sha256. Refused before any work: a precision the target
    cannot run (FP8 on Orin), a model that does not fit its memory. The same inputs give the same bytes."""
    from qwen3_compile.bundle import bundle_artifact
    from qwen3_compile.progress import default_progress
    from qwen3_compile.sizing import GB

    result = bundle_artifact(
        artifact,
        target,
        output,
        max_seq=max_seq,
        smoke_tokens=smoke_tokens,
        force=force,
        progress=default_progress(not as_json),
    )
    from qwen3_compile.schema import encode

    m = result.manifest
    if as_json:
        emit_json(
            {
                "bundle": str(result.path),
                "bytes": result.bytes,
                "sha256": result.sha256,
                "seconds": result.seconds,
                "target": m.target.name,
                "moe": encode(m.moe),
                "memory": encode(m.memory),
                "files": len(m.files),
                "smoke_reference": m.smoke_reference,
                "warnings": list(m.warnings),
            }
        )
        return
    mem = m.memory
    click.echo(
        f"wrote {result.path}: {result.bytes / 1e6:.1f} MB, {len(m.files)} files, sha256 {result.sha256}\n"
        f"  {m.artifact.label} for {m.target.name} (SM {m.target.sm}, TensorRT >= "
        f"{m.target.min_tensorrt}); MoE lowering: {m.moe.lowering}\n"
        f"  memory at {mem.context} tokens: {mem.total / GB:.2f} GB of "
        f"{mem.usable / GB:.1f} GB usable\n"
        f"  next: copy it to the device, `python3 runner.py unpack` or tar -xzf, then see its README.md"
    )
    for warning in m.warnings:
        click.secho(f"warning: {warning}", err=True, fg="yellow")


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size such as 200G, 512M or 1000000.") from None


def _size_limit(flag: str, default: int, help: str) -> Callable:
    """A byte limit given as 200G, 512M or plain bytes."""
    return click.option(flag, default=f"{default >> 30}G", show_default=True, callback=_size, help=help)


@click.command("verify-bundle")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--trt-version", help="The device's TensorRT version (checked against the target's minimum).")
@click.option("--sm", help="The device GPU's compute capability, e.g. 8.7 (must equal the target's).")
@_size_limit("--max-total-size", MAX_TOTAL_BYTES, "Refuse a bundle whose files add up to more.")
@_size_limit(
    "--max-file-size", MAX_FILE_BYTES, "Refuse a bundle with a larger file (the weights are one file)."
)
@click.option(
    "--max-files", type=click.IntRange(min=1), default=MAX_FILES, show_default=True, help="Refuse more files."
)
@stage_command
def verify_bundle_command(
    bundle: Path,
    trt_version: str | None,
    sm: str | None,
    max_total_size: int,
    max_file_size: int,
    max_files: int,
    as_json: bool,
) -> None:
    """Check BUNDLE (a .tar.gz or an extracted folder): every file's sha256 against the manifest, no file
    missing or added, no link or special file, safe extraction within the limits; with --trt-version /
    --sm, compatibility with the device. Exit 2 when the bundle is refused (unsafe or malformed), 1 naming
    the first changed, missing or added file or the incompatibility."""
    from qwen3_compile.bundle import verify_bundle
    from qwen3_compile.bundle.device.bundle_files import Limits

    result = verify_bundle(bundle, trt_version, sm, Limits(max_total_size, max_file_size, max_files))
    target = result.manifest.target
    if as_json:
        emit_json(
            {
                "bundle": str(result.path),
                "ok": True,
                "files": result.files,
                "target": target.name,
                "checked": {"tensorrt": result.checked_trt, "sm": result.checked_sm},
            }
        )
        return
    checked = ", ".join(
        f"{what} {value} ok" for what, value in (("TensorRT", trt_version), ("SM", sm)) if value is not None
    )
    click.echo(
        f"ok: {result.files} files match the manifest; target {target.name} (SM {target.sm}, "
        f"TensorRT >= {target.min_tensorrt})"
        + (f"; {checked}" if checked else "; device compatibility not checked")
    )
