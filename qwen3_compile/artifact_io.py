"""Writing artifact folders atomically: build in a temporary sibling folder, rename when complete.

A crash, a full disk or Ctrl-C leaves the previous folder (or nothing) behind, never a half-written
model. `--force` replaces an existing folder only after the new one is complete.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from qwen3_compile.errors import BadInputError

# ONNX protobufs cannot exceed 2 GB; larger models keep their weights in one external data file
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@contextmanager
def atomic_output_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise BadInputError(
            "the output directory already exists.",
            file=out_dir,
            field="--output",
            fix="choose another directory or pass --force to replace it.",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save with external data (one `<name>.data` file) when the weights exceed the protobuf limit."""
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
