"""Shared pieces of the commands: error handling and exit codes, --json/--debug, reusable options."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from qwen3_compile.errors import BadInputError, Qwen3CompileError


def error_object(err: Qwen3CompileError) -> dict:
    """What `--json` prints on stdout when a command fails."""
    return {
        "error": err.message,
        "exit_code": err.exit_code,
        "file": err.file,
        "field": err.field,
        "fix": err.fix,
    }


def _fail(err: Qwen3CompileError, as_json: bool) -> None:
    if as_json:
        emit_json(error_object(err))
    click.echo(f"error: {err.message}", err=True)
    sys.exit(err.exit_code)


def os_error(err: OSError) -> Qwen3CompileError:
    """A file the command could not read or write (read-only folder, full disk, missing permission)."""
    return BadInputError(
        f"{err.strerror or err}.",
        file=err.filename,
        fix="check that the path exists, is writable and its disk has room (`df -h`), then run again.",
    )


def as_error(err: BaseException) -> Qwen3CompileError:
    """Any failure as the error users see: ours as raised, OS errors naming the file, the rest an
    'internal error' line (the traceback only with --debug)."""
    if isinstance(err, Qwen3CompileError):
        return err
    if isinstance(err, OSError):
        return os_error(err)
    if isinstance(err, KeyboardInterrupt):
        return _Interrupted("interrupted.")
    return Qwen3CompileError(
        f"internal error: {type(err).__name__}: {err}", fix="run again with --debug and report the traceback."
    )


def stage_command(fn: Callable) -> Callable:
    """Adds --json and --debug, and turns library errors into a message and an exit code; with --json the
    error is also a JSON object on stdout. Nothing reaches the user as a traceback without --debug."""

    @click.option(
        "--json", "as_json", is_flag=True, help="Print the result (or the error) as JSON on stdout."
    )
    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args, as_json: bool, debug: bool, **kwargs):
        try:
            return fn(*args, as_json=as_json, **kwargs)
        except click.ClickException:
            raise  # usage errors: CommandGroup prints them
        except (Exception, KeyboardInterrupt) as err:
            if debug and not isinstance(err, KeyboardInterrupt):
                raise
            _fail(as_error(err), as_json)

    return wrapper


class _Interrupted(Qwen3CompileError):
    exit_code = 130


class CommandGroup(click.Group):
    """The command group: a usage error (unknown option, bad value) is also a JSON object on stdout when
    the command line asks for --json, like every other failure."""

    def main(self, args=None, prog_name=None, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(args=argv, prog_name=prog_name, standalone_mode=False, **extra)
        except click.ClickException as err:
            if "--json" in argv:
                param = getattr(err, "param", None)
                emit_json(
                    {"error": err.format_message(), "exit_code": err.exit_code, "file": None}
                    | {"field": param.opts[0] if param is not None and param.opts else None, "fix": None}
                )
            err.show()
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)


def emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


# the backend registry's names (backends/registry.py BACKENDS; a test keeps them equal), spelled out here so
# that parsing a command line imports no runtime
BACKEND_CHOICES = ("ort", "ort-cuda", "tensorrt", "tensorrt-rtx")


def ort_ops_option(fn: Callable) -> Callable:
    """`--ort-ops PATH`: an ONNX Runtime CUDA custom-op library for the ort-cuda backend."""
    return click.option(
        "--ort-ops",
        type=click.Path(path_type=Path),
        help="With --backend ort-cuda: register this ONNX Runtime custom-op library (libqmoe_ort.so, "
        "plugins/README.md) so the MoE nodes run on the project's CUDA kernels. Same as setting "
        "$QWEN3_COMPILE_ORT_OPS.",
    )(fn)


def layers_option(fn: Callable) -> Callable:
    return click.option(
        "--layers",
        type=click.IntRange(min=1),
        help="Presets only: instantiate with this many layers at full width.",
    )(fn)


# runtimes that `--target` once named, before lowering became its own command
_RUNTIME_NAMES = {"ort": "ort", "onnxruntime": "ort", "tensorrt": "tensorrt", "trt": "tensorrt"}


class DeploymentTarget(click.Choice):
    """A deployment device from recipes/targets/*.toml; a runtime name gets the command that lowers for it."""

    name = "target"

    def __init__(self, only: tuple[str, ...] | None = None):
        from qwen3_compile.targets import all_targets

        super().__init__(only or tuple(all_targets()))

    def convert(self, value, param, ctx):
        if value in _RUNTIME_NAMES:
            self.fail(
                f"'{value}' is a runtime, not a deployment device. Lowering for a runtime is its own "
                f"command: `qwen3-compile lower ARTIFACT --for {_RUNTIME_NAMES[value]} -o DIR`.",
                param,
                ctx,
            )
        return super().convert(value, param, ctx)


def target_option(required: bool = False, only: tuple[str, ...] | None = None, help: str = "") -> Callable:
    """`--target DEVICE`, the same option on every command: a deployment device, never a runtime."""
    return click.option(
        "--target",
        type=DeploymentTarget(only),
        required=required,
        help=help or "Deployment device (recipes/targets/*.toml).",
    )


def removed_option(name: str, replacement: str) -> Callable:
    """A flag that no longer exists: hidden, and exit 2 naming what replaced it."""

    def refuse(ctx: click.Context, param: click.Parameter, value) -> None:
        if value is not None:
            raise click.UsageError(f"{name} was removed: {replacement}", ctx)

    return click.option(name, hidden=True, expose_value=False, callback=refuse)
