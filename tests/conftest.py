"""Shared fixtures: checkpoints saved by transformers' own save_pretrained from the tiny presets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def saved_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """tiny-dense and tiny-moe written with save_pretrained, single-file and sharded."""
    from qwen3_compile.models.loading import load_model

    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name in ("tiny-dense", "tiny-moe"):
        model = load_model(name).model
        model.save_pretrained(root / name)
        model.save_pretrained(root / f"{name}-sharded", max_shard_size="4MB")
        out[name] = root / name
        out[f"{name}-sharded"] = root / f"{name}-sharded"
    return out


@pytest.fixture(scope="session")
def reseal():
    """reseal(folder): rewrite the folder's manifest `outputs` for its files as they are now. Tests that
    damage an artifact's graph on purpose (to check what validation or quantization then finds) stand in
    for a producer that wrote wrong numbers; a folder edited after the fact is refused on its hashes."""
    import json

    from qwen3_compile.storage.manifest import sha256_file

    def seal(folder: Path) -> Path:
        path = Path(folder) / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["outputs"] = {
            name: {"sha256": sha256_file(Path(folder) / name), "bytes": (Path(folder) / name).stat().st_size}
            for name in manifest["outputs"]
        }
        path.write_text(json.dumps(manifest))
        return Path(folder)

    return seal


@pytest.fixture
def checkpoint_copy(saved_checkpoints, tmp_path):
    """A fresh, writable copy of a saved checkpoint that a test may damage."""

    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(saved_checkpoints[name], dst)
        return dst

    return make
