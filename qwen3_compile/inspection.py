"""The `inspect` stage: what a model is, how big it is in each precision, and where it fits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_compile.models.checkpoint import refuse_nonfinite, scan_nonfinite
from qwen3_compile.models.loading import ModelSource, resolve_model
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.sizing import (
    GB,
    ParameterCounts,
    TargetFit,
    count_parameters,
    fit_targets,
    imported_weight_bytes,
    kv_bytes_per_token,
    weight_bytes,
)
from qwen3_compile.targets import all_targets
from qwen3_compile.tokenizer import tokenizer_dir_for

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class CheckpointSummary:
    directory: str
    files: int
    dtypes: list[str]
    bytes_on_disk: int
    expert_layout: str
    # None when values were not read (--quick); else the names of tensors with NaN/Inf
    nonfinite_tensors: list[str] | None
    # a published quantized checkpoint: method, bits, group size, desc_act, which modules, bytes
    quantization: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelReport:
    model: str
    kind: str
    architecture: dict[str, Any]
    parameters: ParameterCounts
    weight_gb: dict[str, float]
    kv_bytes_per_token: dict[str, int]
    context: int
    fits: list[TargetFit]
    tokenizer_dir: str
    checkpoint: CheckpointSummary | None
    published: dict[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        params = dataclasses.asdict(self.parameters) | {"non_embedding": self.parameters.non_embedding}
        return {
            "model": self.model,
            "kind": self.kind,
            "architecture": self.architecture,
            "parameters": params,
            "published_parameters_b": self.published,
            "weight_gb": self.weight_gb,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "context": self.context,
            "targets": [
                {
                    "target": f.target.name,
                    "sm": f.target.sm,
                    "memory_gb": f.target.memory_gb,
                    "best_precision": f.best,
                    "headroom_gb": f.headroom_gb,
                }
                for f in self.fits
            ],
            "tokenizer_dir": self.tokenizer_dir,
            "checkpoint": dataclasses.asdict(self.checkpoint) if self.checkpoint else None,
        }


def _architecture(source: ModelSource) -> dict[str, Any]:
    arch = source.arch
    fields = dataclasses.asdict(arch)
    return {"model_type": arch.model_type, **fields}


def inspect_model(
    spec: str | Path | ModelSource,
    *,
    num_layers: int | None = None,
    context: int = DEFAULT_CONTEXT,
    verify_weights: bool = True,
    allow_nonfinite: bool = False,
    progress: Progress = NO_PROGRESS,
) -> ModelReport:
    """Summarise MODEL. For checkpoints, headers are always validated; with `verify_weights` every
    tensor is also read once and NaN/Inf values are refused (or, with `allow_nonfinite`, reported)."""
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec, num_layers)
    arch = source.arch
    summary = None
    if source.checkpoint is not None:
        ckpt = source.checkpoint
        nonfinite = scan_nonfinite(ckpt, progress) if verify_weights else None
        if nonfinite and not allow_nonfinite:
            refuse_nonfinite(ckpt, nonfinite)
        summary = CheckpointSummary(
            directory=str(ckpt.directory),
            files=len(ckpt.files),
            dtypes=sorted(ckpt.dtypes),
            bytes_on_disk=ckpt.weight_bytes,
            expert_layout=ckpt.expert_layout.value if arch.is_moe else "-",
            nonfinite_tensors=nonfinite,
            quantization=ckpt.quantization.summary() if ckpt.quantization is not None else None,
        )
    published = None
    if source.preset is not None and source.preset.published_params_b is not None and num_layers is None:
        p = source.preset
        published = {
            "total": p.published_params_b,
            "active": p.published_active_b,
            "non_embedding": p.published_non_embedding_b,
        }
    weights = {p: weight_bytes(arch, p) for p in ("fp16", "fp8", "int8", "int4")}
    imported = source.quantization
    if imported:  # its precision is fixed: that one, at the size it is stored (the rest in fp16)
        weights = {imported.format.precision: imported_weight_bytes(arch, imported)}
    return ModelReport(
        model=source.spec,
        kind=source.kind,
        architecture=_architecture(source),
        parameters=count_parameters(arch),
        weight_gb={p: b / GB for p, b in weights.items()},
        kv_bytes_per_token={d: kv_bytes_per_token(arch, d) for d in ("fp16", "fp8")},
        context=context,
        fits=fit_targets(arch, list(all_targets().values()), context, weights=weights),
        tokenizer_dir=str(tokenizer_dir_for(source.tokenizer_dir)),
        checkpoint=summary,
        published=published,
    )
