"""The `export` stage: MODEL -> folder with model.onnx, side files and manifest.json."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from qwen3_compile import artifact_io
from qwen3_compile.artifact_io import atomic_output_dir, save_onnx
from qwen3_compile.errors import BadInputError
from qwen3_compile.export.external_data import ExternalDataWriter
from qwen3_compile.manifest import Timings, sha256_file, write_manifest
from qwen3_compile.models.loading import LoadedModel, ModelSource, load_weights, resolve_model
from qwen3_compile.progress import NO_PROGRESS, Progress

DTYPES = ("fp32", "fp16", "bf16")
MIN_OPSET, MAX_OPSET = 18, 24
DEFAULT_OPSET = 21
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    max_positions: int | None = None  # default: the model's own maximum
    target: str | None = None  # None: the canonical graph; "ort": lowered for ONNX Runtime

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]


@dataclass(frozen=True)
class ExportedArtifact:
    directory: Path
    options: ExportOptions
    op_histogram: dict[str, int]
    lowering: dict[str, Any] | None
    manifest: dict[str, Any] = field(repr=False)

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE


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
    if options.target == "ort" and source.arch.is_moe and options.dtype != "fp32":
        raise BadInputError(
            f"ONNX Runtime's MoE kernel runs fp32 experts only; --dtype {options.dtype} "
            f"cannot be lowered for --target ort.",
            field="--dtype",
            fix="export with --dtype fp32 for ONNX Runtime (quantize later with a recipe), "
            "or drop --target to keep the canonical graph.",
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


def _input_record(source: ModelSource) -> dict[str, Any]:
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
        "files": {p.name: sha256_file(p) for p in files},
    }


def export_onnx(
    model: str | Path | ModelSource | LoadedModel,
    output: str | Path,
    options: ExportOptions = ExportOptions(),
    *,
    num_layers: int | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress = NO_PROGRESS,
) -> ExportedArtifact:
    """Export MODEL to `output`/model.onnx (canonical graph, or lowered for `options.target`)."""
    from qwen3_compile.export.graph import build_graph
    from qwen3_compile.export.side_files import write_side_files
    from qwen3_compile.lower import lower

    timings = Timings()
    if isinstance(model, LoadedModel):
        source, state = model.source, model.model.state_dict()
    else:
        source = model if isinstance(model, ModelSource) else resolve_model(model, num_layers)
        state = None
    max_positions = check_options(source, options)
    output = Path(output)
    if output.exists() and not force:  # checked again atomically; fail before the expensive load
        raise BadInputError(
            "the output directory already exists.",
            file=output,
            field="--output",
            fix="choose another directory or pass --force to replace it.",
        )
    owned = state is None  # weights we loaded ourselves are consumed while the graph is built
    if owned:
        with timings.stage("load"):
            state = load_weights(source, allow_nonfinite=allow_nonfinite, progress=progress)
    dtype = options.torch_dtype()
    streamed = sum(t.numel() for t in state.values()) * dtype.itemsize > artifact_io.EXTERNAL_DATA_THRESHOLD
    with atomic_output_dir(output, force) as tmp:
        # large models stream their weights into model.onnx.data as the graph is built
        sink = ExternalDataWriter(tmp / f"{MODEL_FILE}.data") if streamed else None
        with timings.stage("build_graph"), progress.stage("build graph", total=None):
            graph = build_graph(source.arch, state, dtype, options.opset, consume=owned, weight_sink=sink)
        del state
        report = None
        if options.target is not None:
            with timings.stage("lower"):
                report = lower(graph, options.target, tmp, sink).to_dict()
        if sink is not None:
            sink.close()
        histogram = dict(
            sorted(
                Counter(
                    f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.graph.node
                ).items()
            )
        )
        with timings.stage("write"), progress.stage("write model", total=None):
            save_onnx(graph, tmp / MODEL_FILE)
            write_side_files(tmp, source.arch, max_positions, source.tokenizer_dir)
        manifest = write_manifest(
            tmp,
            "export",
            _input_record(source),
            asdict(options) | {"max_positions": max_positions},
            timings,
            {"op_histogram": histogram, "lowering": report, "architecture": source.arch.to_hf_dict()},
        )
    return ExportedArtifact(output, options, histogram, report, manifest)
