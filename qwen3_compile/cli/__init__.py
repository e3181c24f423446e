"""The `qwen3-compile` command line: thin Click commands over the library's stages, one module each.

Each command parses options, calls one library function and renders its result (a table for people,
`--json` for machines). Exit codes: 0 ok, 1 a check failed, 2 bad input.
"""

from __future__ import annotations

import click

from qwen3_compile import __version__
from qwen3_compile.cli.build_cmd import build_command
from qwen3_compile.cli.bundle_cmd import bundle_command, verify_bundle_command
from qwen3_compile.cli.common import CommandGroup
from qwen3_compile.cli.compile_cmd import compile_command
from qwen3_compile.cli.export_cmd import export_command
from qwen3_compile.cli.inspect_cmd import inspect_command
from qwen3_compile.cli.lower_cmd import lower_command
from qwen3_compile.cli.quantize_cmd import quantize_command
from qwen3_compile.cli.run_cmd import run_command
from qwen3_compile.cli.validate_cmd import validate_command


@click.group(
    cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.version_option(__version__, prog_name="qwen3-compile")
def main() -> None:
    """Compile Qwen3 dense and MoE checkpoints into validated ONNX / TensorRT deployment artifacts.

    MODEL is a preset name (see `qwen3-compile inspect --list`) or a local Hugging Face checkpoint
    directory (config.json + safetensors).
    """


for command in (
    inspect_command,
    export_command,
    compile_command,
    quantize_command,
    lower_command,
    validate_command,
    run_command,
    build_command,
    bundle_command,
    verify_bundle_command,
):
    main.add_command(command)
