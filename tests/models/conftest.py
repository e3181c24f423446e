"""Tiny checkpoints saved by the tests themselves with safetensors (no transformers, milliseconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.tensors import ExpertLayout, expected_shapes

_COMMON = dict(
    vocab_size=256,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    max_position_embeddings=128,
    rope_theta=1e6,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_ARCHS = {
    "dense": Qwen3Arch(**_COMMON, tie_word_embeddings=True, intermediate_size=64),
    "moe": Qwen3Arch(**_COMMON, tie_word_embeddings=False, num_experts=4, top_k=2, moe_intermediate_size=16),
}


def save_tiny_checkpoint(kind: str, directory: Path, sharded: bool = False) -> Path:
    """config.json and random weights as save_pretrained lays them out (experts per expert; `sharded`:
    two shards and model.safetensors.index.json)."""
    import torch
    from safetensors.torch import save_file

    arch = TINY_ARCHS[kind]
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shapes = expected_shapes(arch, ExpertLayout.PER_EXPERT)
    tensors = {name: 0.1 * torch.randn(shape, generator=g) for name, shape in shapes.items()}
    (directory / "config.json").write_text(json.dumps(arch.to_hf_dict(), indent=2))
    if not sharded:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, directory / shard, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": {n: shard for shard, part in halves.items() for n in part},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """tiny_checkpoint(kind, sharded=False) -> a fresh tiny checkpoint folder under tmp_path/ckpt."""
    return lambda kind, sharded=False: save_tiny_checkpoint(kind, tmp_path / "ckpt", sharded)
