"""Shared pieces of the commands: error handling and exit codes, --json/--debug, reusable options."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable

import click

from qwen3_compile.errors import Qwen3CompileError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def stage_command(fn: Callable) -> Callable:
    """Adds --json and --debug, and turns library errors into a message and an exit code."""

    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args, as_json: bool, debug: bool, **kwargs):
        try:
            return fn(*args, as_json=as_json, **kwargs)
        except Qwen3CompileError as err:
            if debug:
                raise
            _fail(err.message, err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted.", 130)

    return wrapper


def emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


# the backend registry's names (backends/registry.py BACKENDS; a test keeps them equal), spelled out here so
# that parsing a command line imports no runtime
BACKEND_CHOICES = ("ort", "ort-cuda", "tensorrt", "tensorrt-rtx")


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
