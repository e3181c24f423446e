"""Turn a MODEL argument (preset name or checkpoint directory) into a loaded PyTorch reference model.

The reference is transformers' own Qwen3 / Qwen3-MoE implementation: it is what users trust, so
parity is measured against it. Weights come from `checkpoint.load_state_dict` (safetensors only) or,
for presets, from a deterministic per-tensor random generator.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.checkpoint import Checkpoint, load_state_dict, open_checkpoint
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.presets import Preset, get_preset, preset_names
from qwen3_compile.models.tensors import expected_shapes
from qwen3_compile.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    import torch

    from qwen3_compile.models.outliers import ActivationOutliers
    from qwen3_compile.models.quantized import ImportedQuantization


@dataclass(frozen=True)
class ModelSource:
    """What a MODEL argument names, before any weights are read."""

    spec: str
    arch: Qwen3Arch
    preset: Preset | None = None
    checkpoint: Checkpoint | None = None

    @property
    def kind(self) -> str:
        return "preset" if self.preset is not None else "checkpoint"

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.checkpoint.directory if self.checkpoint is not None else None

    @property
    def quantization(self) -> ImportedQuantization | None:
        """A published quantized checkpoint's own quantization (FP8, AWQ, GPTQ); None otherwise."""
        return self.checkpoint.quantization if self.checkpoint is not None else None


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    model: torch.nn.Module  # transformers Qwen3ForCausalLM / Qwen3MoeForCausalLM, eval mode; never modified
    # greedy reference runs by (prompt ids, decode steps, prefill chunk): validations against the same loaded
    # model (compile --target's recipe search, a test session) run each prompt once
    generations: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def arch(self) -> Qwen3Arch:
        return self.source.arch


def resolve_model(spec: str | Path, num_layers: int | None = None) -> ModelSource:
    """A preset name or a checkpoint directory; validates the checkpoint's headers."""
    spec = str(spec)
    path = Path(spec)
    if path.exists():
        if num_layers is not None:
            raise BadInputError(
                "--layers applies to presets only.",
                file=path,
                field="layers",
                fix="drop --layers, or save a checkpoint with fewer layers.",
            )
        ckpt = open_checkpoint(path)
        return ModelSource(spec, ckpt.arch, checkpoint=ckpt)
    if spec in preset_names():
        preset = get_preset(spec, num_layers)
        if preset.checkpoint_dir is not None:  # a trained model: weights from its shipped checkpoint
            ckpt = open_checkpoint(preset.checkpoint_dir)
            return ModelSource(spec, ckpt.arch, checkpoint=ckpt)
        return ModelSource(spec, preset.arch, preset=preset)
    if "/" in spec or spec.startswith("."):
        raise BadInputError(
            "the path does not exist.",
            file=path,
            fix="pass an existing checkpoint directory or a preset name.",
        )
    return ModelSource(spec, get_preset(spec).arch)  # raises the unknown-preset error


def random_state_dict(
    arch: Qwen3Arch, seed: int, outliers: ActivationOutliers | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic random weights, independent of torch's global RNG and of the layer count.

    Each tensor has its own generator seeded from (seed, name), so layer i has the same weights
    whether the model has 2 or 28 layers. Scales keep activations O(1) through the stack.
    """
    return {
        name: random_tensor(arch, name, shape, seed, outliers)
        for name, shape in expected_shapes(arch).items()
    }


def random_tensor(
    arch: Qwen3Arch, name: str, shape: tuple[int, ...], seed: int, outliers: ActivationOutliers | None = None
) -> torch.Tensor:
    """One tensor of `random_state_dict` (the exporter generates them layer by layer); presets with
    `outlier_channels` get massive activation channels (models/outliers.py, same float function)."""
    t = _random_tensor(arch, name, shape, seed)
    if outliers is not None:
        from qwen3_compile.models.outliers import with_outliers

        t = with_outliers(arch, name, t, outliers)
    return t


def _random_tensor(arch: Qwen3Arch, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * t
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        # logits with std ~8 whatever the width: peaked next-token distributions (mean top-1
        # probability ~0.8), as trained
        # models have (transformers' 0.02 init gives near-uniform logits and a meaningless top-1)
        return t * (8.0 / arch.hidden_size**0.5)
    return t * shape[-1] ** -0.5  # unit-variance outputs for unit-variance inputs


def build_reference_model(
    arch: Qwen3Arch, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """transformers' model for `arch`, weights assigned from `state` without a throw-away init."""
    import torch
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    config = arch.to_transformers_config()
    cls = Qwen3MoeForCausalLM if arch.is_moe else Qwen3ForCausalLM
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if arch.tie_word_embeddings:
        state = dict(state)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (rotary inv_freq) are not in the state dict: rebuild them for real
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if arch.tie_word_embeddings:
        model.tie_weights()
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"reference model has unloaded tensors: {leftovers[:5]}")
    return model.eval()


def load_model(
    spec: str | Path | ModelSource,
    *,
    num_layers: int | None = None,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
    progress: Progress = NO_PROGRESS,
    device: str = "cpu",
) -> LoadedModel:
    """Load MODEL as the fp32 (or `dtype`) PyTorch reference, on `device` ("cpu" or "cuda": runners move
    their inputs to the model's device and return host arrays)."""
    import torch

    source = spec if isinstance(spec, ModelSource) else resolve_model(spec, num_layers)
    dtype = dtype or torch.float32
    if source.checkpoint is not None:
        state = load_state_dict(
            source.checkpoint, dtype=dtype, allow_nonfinite=allow_nonfinite, progress=progress
        )
    else:
        with progress.stage(f"random weights ({source.spec})", total=None):
            state = random_state_dict(source.arch, source.preset.seed, source.preset.outliers)
    model = build_reference_model(source.arch, state, dtype)
    return LoadedModel(source, model if device == "cpu" else model.to(device))
