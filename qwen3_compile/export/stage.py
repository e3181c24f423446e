"""The `export` stage: MODEL -> folder with model.onnx, side files and manifest.json."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from qwen3_compile import __version__
from qwen3_compile.errors import BadInputError, Qwen3CompileError
from qwen3_compile.export.resume import ExportJournal, fingerprint, resumable_output_dir
from qwen3_compile.export.side_files import write_side_files
from qwen3_compile.export.weights import WeightSource
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.loading import LoadedModel, ModelSource, resolve_model
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.storage import artifact_dir
from qwen3_compile.storage.artifact_dir import atomic_output_dir, check_not_an_input, save_onnx
from qwen3_compile.storage.external_data import ExternalDataWriter
from qwen3_compile.storage.manifest import Timings, read_manifest_as, sha256_file, write_manifest
from qwen3_compile.storage.manifests import ExportManifest, GraphOptions

DTYPES = ("fp32", "fp16", "bf16")
MIN_OPSET, MAX_OPSET = 18, 24
DEFAULT_OPSET = 21
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    max_positions: int | None = None  # default: the model's own maximum

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]


@dataclass(frozen=True)
class ExportedArtifact:
    directory: Path
    options: ExportOptions
    op_histogram: dict[str, int]
    manifest: ExportManifest = field(repr=False)

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @classmethod
    def from_folder(cls, folder: str | Path) -> ExportedArtifact:
        """What `export_onnx` returned for `folder`, read back from its manifest."""
        manifest = read_manifest_as(Path(folder), ExportManifest)
        recorded = manifest.options
        options = ExportOptions(recorded.dtype, recorded.opset, recorded.max_positions)
        return cls(Path(folder), options, manifest.op_histogram, manifest)


def check_options(source: ModelSource, options: ExportOptions) -> int:
    """Refuse bad combinations before any work; returns the effective max positions."""
    if options.dtype not in DTYPES:
        raise BadInputError(
            f"unsupported dtype '{options.dtype}'.", field="--dtype", fix=f"use one of: {', '.join(DTYPES)}."
        )
    newest = min(MAX_OPSET, onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= options.opset <= newest:
        raise BadInputError(
            f"opset {options.opset} is not supported.",
            field="--opset",
            fix=f"use an opset from {MIN_OPSET} to {newest} (default {DEFAULT_OPSET}).",
        )
    limit = source.arch.max_position_embeddings
    max_positions = options.max_positions or limit
    if not 0 < max_positions <= limit:
        raise BadInputError(
            f"--max-positions {max_positions} is beyond the model's {limit} positions.",
            field="--max-positions",
            fix=f"use a value from 1 to {limit}.",
        )
    return max_positions


def _input_record(source: ModelSource, hashes: bool = True) -> dict[str, Any]:
    if source.checkpoint is None:
        preset = source.preset
        return {
            "model": source.spec,
            "kind": "preset",
            "seed": preset.seed,
            "num_layers": source.arch.num_layers,
        }
    files = [source.checkpoint.directory / "config.json", *source.checkpoint.files]
    return {
        "model": str(source.checkpoint.directory),
        "kind": "checkpoint",
        "files": {p.name: sha256_file(p) if hashes else None for p in files},
    }


def _fingerprint(source: ModelSource, options: ExportOptions, max_positions: int) -> str:
    record: dict[str, Any] = {
        "version": __version__,
        "options": asdict(options) | {"max_positions": max_positions},
        "architecture": source.arch.to_hf_dict(),
        "model": _input_record(source, hashes=False),
    }
    if source.checkpoint is not None:  # the layout every offset in the journal was computed from
        record["tensors"] = sorted(
            (n, e.file.name, e.dtype, e.shape, e.begin, e.end) for n, e in source.checkpoint.tensors.items()
        )
    return fingerprint(record)


def disk_needed(source: ModelSource, options: ExportOptions) -> int:
    """Bytes of free disk the export needs at its peak (the external data, the graph, side files)."""
    from qwen3_compile.export.weights import external_bytes, weight_groups

    groups = weight_groups(source.arch)
    data = external_bytes(groups, options.torch_dtype())
    return data + (1 << 20)  # model.onnx, side files


def check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise BadInputError(
            f"not enough free disk: the export needs about {needed / 1e9:.2f} GB ({needed} bytes), "
            f"{free / 1e9:.2f} GB ({free} bytes) are free.",
            file=folder.parent,
            field="--output",
            fix="free disk space or export to a larger disk (-o); --dtype bf16 or fp16 halves an fp32 "
            "export.",
        )


def _weight_source(source: ModelSource, allow_nonfinite: bool) -> WeightSource:
    from qwen3_compile.export.weights import CheckpointSource, PresetSource

    if source.checkpoint is not None:
        return CheckpointSource(source.checkpoint, allow_nonfinite)
    return PresetSource(source.arch, source.preset.seed, source.preset.outliers)


def _check_imported(options: ExportOptions, resume: bool, loaded: bool) -> None:
    """An imported quantized checkpoint keeps its own values: blocked DequantizeLinear, fp32/fp16 scales."""
    if loaded:
        raise BadInputError(
            "a loaded model holds the dequantized float weights, not the checkpoint's quantized ones.",
            field="model",
            fix="export the checkpoint folder itself.",
        )
    if options.opset < 21:
        raise BadInputError(
            f"a quantized checkpoint's weights need blocked DequantizeLinear (opset 21); --opset is "
            f"{options.opset}.",
            field="--opset",
            fix="export with --opset 21 or higher (the default is 21).",
        )
    if options.dtype == "bf16":
        raise BadInputError(
            "a quantized checkpoint exports as an fp32 or fp16 graph.",
            field="--dtype",
            fix="export with --dtype fp32 (the ONNX Runtime reference) or fp16.",
        )
    if resume:
        raise BadInputError(
            "--resume is not supported for quantized checkpoints.",
            field="--resume",
            fix="rerun the export without --resume.",
        )


def _imported_record(imported) -> dict[str, Any]:
    """The manifest's record of an imported quantization, and how ONNX Runtime must run it: the QDQ graph as
    written (no MatMulNBits fusion, which would quantize the activations too), FP8 at ENABLE_BASIC."""
    from qwen3_compile.backends.onnxruntime.settings import ORT_QDQ

    return {
        "imported": imported.summary(),
        "ort_optimization": "basic" if imported.format.method == "fp8" else "all",
        "ort_session_config": dict(ORT_QDQ["reference"]),
    }


def _resume_hint(err: Exception, journal: ExportJournal | None, num_layers: int) -> Exception:
    """The error, telling how to continue where a journaled export stopped."""
    if journal is None or not journal.groups_done:
        return err
    layers = journal.layers_done(num_layers)
    hint = (
        f"Then rerun the same export with --resume: {journal.folder} keeps the {layers} finished "
        f"layer(s) of {num_layers}."
    )
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        problem = "the disk filled up while writing the export."
        return BadInputError(problem, file=journal.folder, fix=f"free disk space. {hint}")
    if isinstance(err, Qwen3CompileError):
        return type(err)(err.problem, file=err.file, field=err.field, fix=f"{err.fix or ''} {hint}".strip())
    return err


def export_onnx(
    model: str | Path | ModelSource | LoadedModel,
    output: str | Path,
    options: ExportOptions = ExportOptions(),
    *,
    num_layers: int | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress = NO_PROGRESS,
    resume: bool = False,
) -> ExportedArtifact:
    """Export MODEL to `output`/model.onnx: the canonical graph (`lower` rewrites it per runtime).

    Weights are written layer by layer as the graph is built: from a checkpoint they stream from the
    safetensors files (one layer in memory at a time), from a preset they are generated per tensor, from
    a LoadedModel they are taken from its state dict. Above the protobuf limit they go to external data
    and the export is journaled: `resume=True` continues an interrupted one after its last finished layer.
    """
    from qwen3_compile.export.weights import StateDictSource, external_bytes, weight_groups

    timings = Timings()
    if isinstance(model, LoadedModel):
        source, weights = model.source, StateDictSource(model.model.state_dict())
    else:
        source = model if isinstance(model, ModelSource) else resolve_model(model, num_layers)
        weights = None
    max_positions = check_options(source, options)
    imported = source.quantization
    if imported is not None:
        _check_imported(options, resume, weights is not None)
    output = Path(output)
    if source.checkpoint is not None:
        check_not_an_input(output, [source.checkpoint.directory], "-o")
    if output.exists() and not force:  # checked again atomically; fail before any work
        raise BadInputError(
            "the output directory already exists.",
            file=output,
            field="--output",
            fix="choose another directory or pass --force to replace it.",
        )
    dtype = options.torch_dtype()
    arch = source.arch
    streamed = external_bytes(weight_groups(arch), dtype) > artifact_dir.EXTERNAL_DATA_THRESHOLD
    data_file = f"{MODEL_FILE}.data"
    if streamed and weights is None:  # a source we can read again: journaled, resumable
        folder = resumable_output_dir(
            output, force, resume, _fingerprint(source, options, max_positions), data_file
        )
    else:
        folder = contextlib.nullcontext(None)
    with folder as journal, contextlib.ExitStack() as stack:
        tmp = journal.folder if journal is not None else stack.enter_context(atomic_output_dir(output, force))
        resume_from, done = (journal.resume_offset, journal.groups_done) if journal else (0, 0)
        check_disk(tmp, disk_needed(source, options) - resume_from)
        if weights is None:
            weights = _weight_source(source, allow_nonfinite)
        try:
            graph = _build(
                source.arch, weights, options, tmp, journal, (resume_from, done), streamed, timings, progress
            )
        except (Qwen3CompileError, OSError) as err:
            hinted = _resume_hint(err, journal, arch.num_layers)
            if hinted is err:
                raise
            raise hinted from err
        dequantized = getattr(weights, "dequantized", None)
        if dequantized:
            from qwen3_compile.export.imported import rewire

            rewire(graph.graph, dequantized)
        histogram = dict(
            sorted(
                Counter(
                    f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.graph.node
                ).items()
            )
        )
        if journal is not None:
            journal.remove()  # saving compacts the data file: from here on a rerun starts over
        with timings.stage("write"), progress.stage("write model", total=None):
            save_onnx(graph, tmp / MODEL_FILE)
            write_side_files(tmp, arch, max_positions, source.tokenizer_dir)
        manifest = write_manifest(
            tmp,
            ExportManifest,
            timings,
            inputs=_input_record(source),
            options=GraphOptions(dtype=options.dtype, opset=options.opset, max_positions=max_positions),
            op_histogram=histogram,
            architecture=arch.to_hf_dict(),
            resumed_after_groups=done,
            **(_imported_record(imported) if imported is not None else {}),
        )
    # the options as applied (max_positions resolved), as `from_folder` reads them back
    return ExportedArtifact(output, replace(options, max_positions=max_positions), histogram, manifest)


def _build(
    arch: Qwen3Arch,
    weights: WeightSource,
    options: ExportOptions,
    tmp: Path,
    journal: ExportJournal | None,
    resumed: tuple[int, int],
    streamed: bool,
    timings: Timings,
    progress: Progress,
) -> onnx.ModelProto:
    """Weights and graph, layer by layer (journaled when `journal`).
    `resumed`: (data-file bytes, weight groups) the journal held when the export started; those groups
    are replayed, not written again."""
    from qwen3_compile.export.graph import build_layered_graph

    resume_from, done = resumed
    sink = ExternalDataWriter(tmp / f"{MODEL_FILE}.data", resume_from) if streamed else None
    layers_done = journal.layers_done(arch.num_layers) if journal else 0
    label = "export layers" + (f" (resumed after {layers_done})" if done else "")

    def on_group(group: int, advance: Callable[[int], None]) -> None:
        if group < done:  # replayed: the file already holds it
            journal.check_replayed(group, sink.offset)
            return
        if journal is not None:
            sink.sync()
            journal.record(sink.offset)
        if 1 <= group <= arch.num_layers:
            advance(1)

    try:
        with (
            timings.stage("build_graph"),
            progress.stage(label, total=arch.num_layers - layers_done, unit="layers") as advance,
        ):
            try:
                graph = build_layered_graph(
                    arch, weights, options.torch_dtype(), options.opset, sink, lambda g: on_group(g, advance)
                )
            finally:
                weights.end_group()
    finally:
        if sink is not None:
            sink.close()
    return graph
