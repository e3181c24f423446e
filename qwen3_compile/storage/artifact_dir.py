"""Writing artifact folders atomically: build in a temporary sibling folder, rename when complete.

A crash, a full disk or Ctrl-C leaves the previous folder (or nothing) behind, never a half-written
model. `--force` replaces an existing folder only after the new one is complete. A run killed outright
(SIGKILL, power loss) leaves its hidden `.NAME.partial-*` folder; the next run of the same output removes
it. Each run holds an flock on its own partial folder, so a live run's folder is never taken for a
leftover.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from qwen3_compile.errors import BadInputError

# ONNX protobufs cannot exceed 2 GB; larger models keep their weights in one external data file
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_MIN_BYTES = 1024
EXTERNAL_ALIGNMENT = 4096


def check_not_an_input(output: Path, inputs: list[Path], option: str = "--output") -> None:
    """No stage writes into, replaces or deletes one of its inputs: `output` may not be an input folder,
    lie inside one, or contain one."""
    out = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            raise BadInputError(
                f"the output folder {'is' if out == source else 'overlaps'} an input ({given}); writing "
                "there would change or delete the input.",
                file=output,
                field=option,
                fix="choose an output folder outside the input folders.",
            )


@contextmanager
def held(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself while it is being written. The kernel releases it when the
    holder dies, however it dies, so a folder nobody holds is a leftover of a killed run."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInputError(
                "another qwen3-compile run is writing this output now.",
                file=folder,
                field="--output",
                fix="wait for that run to finish, or choose another output.",
            ) from None
        yield
    finally:
        os.close(fd)


def remove_stale_partials(out: Path) -> None:
    """Remove the `.NAME.partial-*` folders of killed runs of `out` (those no live run holds) and the
    `.NAME.old-*` folders a rename left behind. Other outputs' leftovers are not ours to touch."""
    out = Path(out)
    name = glob.escape(out.name)
    for stale in out.parent.glob(f".{name}.old-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    for stale in out.parent.glob(f".{name}.partial-*"):
        try:
            with held(stale):
                shutil.rmtree(stale, ignore_errors=True)
        except (BadInputError, OSError):
            continue  # a live run's folder, or not a folder at all


@contextmanager
def atomic_output_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        with held(tmp):
            yield tmp
            refuse_existing(out_dir, force)  # someone may have created it meanwhile
            replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_existing(out_dir: Path, force: bool) -> None:
    """Checked before the work starts, and again before the rename."""
    if Path(out_dir).exists() and not force:
        raise BadInputError(
            "the output directory already exists.",
            file=out_dir,
            field="--output",
            fix="choose another directory or pass --force to replace it.",
        )


def replace_dir(src: Path, dest: Path) -> None:
    """Rename the complete folder `src` to `dest`. An existing `dest` is renamed aside first and removed
    only once `src` is in place: a crash leaves the old folder or the new one, never a half-written one."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        dest.rename(old)
    src.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_graph(path: Path, load_external_data: bool = False) -> onnx.ModelProto:
    """An artifact's ONNX graph; bytes that are not one (damaged, or a file swapped in with a resealed
    manifest) are bad input naming the file, not a protobuf traceback."""
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise BadInputError(
            f"the file is not a readable ONNX model ({err}).",
            file=path,
            fix="re-run the stage that wrote this folder; never edit an artifact in place.",
        ) from None
    if not model.graph.node:
        raise BadInputError(
            "the file holds no graph (an empty or foreign protobuf).",
            file=path,
            fix="re-run the stage that wrote this folder; never edit an artifact in place.",
        )
    return model


def copy_side_files(src_dir: Path, dst_dir: Path, *, skip: tuple[str, ...]) -> list[str]:
    """Copy the regular files directly in `src_dir` (tokenizer, configs, ...) to `dst_dir`, except those
    whose names start with one of `skip` (e.g. `("model.onnx", "manifest.json")`: the graph, its data
    files, the manifest); folders are not copied. Returns the copied names, sorted."""
    copied = []
    for side in sorted(Path(src_dir).iterdir()):
        if side.is_file() and not side.name.startswith(skip):
            shutil.copyfile(side, Path(dst_dir) / side.name)
            copied.append(side.name)
    return copied


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save `model`; above the protobuf limit, weights go to one external `<name>.data` file.

    Each initializer's bytes are written and then dropped from the proto in place, so saving a large
    model needs no second copy of its weights (the model is left pointing at the external file).
    """
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        # weights were streamed to the data file while building: drop what rewrites replaced, then save
        from qwen3_compile.storage.external_data import compact

        compact(model, path.parent, path.name + ".data")
        onnx.save_model(model, str(path))
        return
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes <= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return
    location = path.name + ".data"
    offset = 0
    with open(path.parent / location, "wb") as data:
        for tensor in model.graph.initializer:
            if len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
                continue
            pad = -offset % EXTERNAL_ALIGNMENT  # aligned offsets let runtimes map tensors directly
            data.write(b"\0" * pad)
            offset += pad
            length = len(tensor.raw_data)
            data.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            offset += length
    onnx.save_model(model, str(path))
