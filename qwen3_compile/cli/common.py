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


def layers_option(fn: Callable) -> Callable:
    return click.option(
        "--layers",
        type=click.IntRange(min=1),
        help="Presets only: instantiate with this many layers at full width.",
    )(fn)
