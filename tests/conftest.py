"""Shared fixtures: checkpoints saved by transformers' own save_pretrained from the tiny presets."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def _reuse_freed_memory() -> None:
    """glibc hands every allocation above its mmap threshold (at most 32 MB) to a fresh mmap and unmaps it on
    free, so each [batch, positions, 151936] logits array is page-faulted in anew: nearly a third of the
    suite's CPU time was the kernel's (208 s system of 670 s on 2 cores). Allocations below 1 GB come from
    the heap here, which keeps freed memory for the next one (same numbers; measured on a 58 MB array
    allocated 200 times: 268,600 -> 1,329 page faults, 11.5 s -> 4.8 s)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # an int: keep up to 2 GB of freed heap


def pytest_configure(config):
    """Parallel workers (pytest -n N) share the machine's cores: one CPU thread each for torch, ONNX Runtime
    and numpy's OpenBLAS. With their defaults (a thread per core each) two workers on two cores oversubscribe
    them, and spinning ORT threads starve the other worker (measured on 2 cores: tests/quantize +
    tests/validate 136 s -> 107 s; a 64x1024 @ 1024x256 numpy product on busy cores: 3.3 ms -> 0.8 ms)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read when numpy loads: before the import below
        import torch

        from qwen3_compile.backends.onnxruntime.settings import THREADS_ENV

        torch.set_num_threads(1)
        os.environ.setdefault(THREADS_ENV, "1")
    _reuse_freed_memory()


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


class Artifacts:
    """The suite's artifacts, each made once per run on first use and shared READ-ONLY: a test that edits
    files copies them first (`artifact_copy`). Parallel workers (pytest -n N) share one root: the first worker
    to ask for an artifact makes it while holding a file lock, the others wait for it; every worker then reads
    the stage's typed result back from the folder (`ExportedArtifact.from_folder`, ...). At the end of each
    worker's session every shared folder it used is checked against its manifest, so a test that changed one
    fails loudly."""

    def __init__(self, root: Path):
        self.root = root
        self.made: dict[tuple[str, str], Path] = {}
        self.results: dict[tuple[str, str], Any] = {}  # what `load` read back, else the folder
        self.models: dict[str, object] = {}

    def once(
        self,
        key: tuple[str, str],
        folder: Path,
        make: Callable[[], object],
        load: Callable[[Path], T] | None = None,
        sealed: bool = True,
    ) -> T | Path:
        """`make()` writes `folder` (or a file); of all workers, the first to ask runs it. Each worker returns
        `load(folder)` (what the tests want of it, read from disk: the same whichever worker made it), or the
        folder. A sealed folder (one with a manifest) is checked by `check_unchanged`."""
        if key not in self.results:
            from filelock import FileLock

            folder.parent.mkdir(parents=True, exist_ok=True)
            done = folder.with_name(folder.name + ".done")  # written once make() has returned
            with FileLock(folder.with_name(folder.name + ".lock")):
                if not done.exists():
                    if folder.is_dir():  # left by a worker whose make() raised: start again
                        shutil.rmtree(folder)
                    folder.unlink(missing_ok=True)
                    make()
                    done.touch()
            self.results[key] = load(folder) if load is not None else folder
            if sealed:
                self.made[key] = folder
        return self.results[key]

    def loaded(self, preset: str):
        """The preset as transformers' model (the PyTorch reference), loaded once."""
        if preset not in self.models:
            from qwen3_compile.models.loading import load_model

            self.models[preset] = load_model(preset)
        return self.models[preset]

    def exported(self, preset: str, dtype: str = "fp32"):
        """`export_onnx`'s ExportedArtifact (from the loaded model: the same bytes as from the preset)."""
        from qwen3_compile.export.stage import ExportedArtifact, ExportOptions, export_onnx

        out = self.root / preset / dtype

        def make():
            source = self.loaded(preset) if dtype == "fp32" else preset
            export_onnx(source, out, ExportOptions(dtype=dtype))

        return self.once((preset, dtype), out, make, ExportedArtifact.from_folder)

    def export(self, preset: str, dtype: str = "fp32") -> Path:
        return self.exported(preset, dtype).directory

    def lowered(self, preset: str, runtime: str = "ort"):
        """`lower --for ort` of the fp32 export: a LoweredArtifact."""
        from qwen3_compile.lower.stage import LoweredArtifact, lower_artifact

        out = self.root / preset / f"lower-{runtime}"
        return self.once(
            (preset, f"lower:{runtime}"),
            out,
            lambda: lower_artifact(self.export(preset), out, runtime),
            LoweredArtifact.from_folder,
        )

    def check_unchanged(self) -> list[str]:
        """Shared folders whose files no longer match their manifest."""
        from qwen3_compile.errors import BadInputError
        from qwen3_compile.storage.manifest import read_manifest, verify_outputs

        changed = []
        for folder in self.made.values():
            try:
                manifest = read_manifest(folder)
                verify_outputs(folder, manifest, tuple(manifest.outputs))
            except BadInputError as err:
                changed.append(f"{folder}: {err.message}")
        return changed

    def plugin_sized_moe(self, dtype: str = "fp16") -> Path:
        """An export of a small MoE whose shapes the qmoe kernels support (hidden 128, experts 8 x 64, top-2):
        tiny-moe's 64-wide layers are below the kernels' minimum, so its builds fall back to dense."""
        out = self.root / "moe-128" / dtype

        def make() -> None:
            import dataclasses

            import torch
            from filelock import FileLock
            from transformers import AutoModelForCausalLM

            from qwen3_compile.export.stage import ExportOptions, export_onnx
            from qwen3_compile.models.presets import get_preset

            arch = dataclasses.replace(
                get_preset("tiny-moe").arch, hidden_size=128, moe_intermediate_size=64, num_experts=8, top_k=2
            )
            checkpoint = self.root / "moe-128-checkpoint"  # also a test's PyTorch reference: written once
            with FileLock(checkpoint.with_name(checkpoint.name + ".lock")):
                if not checkpoint.exists():
                    torch.manual_seed(0)
                    model = AutoModelForCausalLM.from_config(arch.to_transformers_config())
                    model.save_pretrained(checkpoint)
            export_onnx(str(checkpoint), out, ExportOptions(dtype=dtype))

        return self.once(("moe-128", dtype), out, make)

    def plugin_sized_quantized(self, recipe: str) -> Path:
        """`plugin_sized_moe("fp16")` quantized with a weight-only recipe (int8-wo, or int4-rtn at group size
        32): experts the qmoe kernels take as INT8 / INT4 (fp16 scales)."""
        out = self.root / "moe-128" / f"q-{recipe}"

        def make():
            from qwen3_compile.quantize.recipe import load_recipe, with_group_size
            from qwen3_compile.quantize.stage import quantize_artifact

            chosen = load_recipe(recipe)
            if chosen.weights.granularity == "per_group":
                chosen = with_group_size(chosen, 32)
            quantize_artifact(self.plugin_sized_moe("fp16"), chosen, out)

        return self.once(("moe-128", f"recipe:{recipe}"), out, make)

    def quantized_artifact(self, preset: str, recipe: str, dtype: str | None = None):
        """`quantize_artifact`'s QuantizedArtifact for a built-in recipe (`NAME+kv-fp8`: with the FP8 KV
        cache) applied to the preset's export (`dtype`: fp32 for quantizing recipes unless given, fp16 for the
        fp16 baseline); per-group (INT4) recipes at group size 32, which divides the tiny presets' 64- and
        32-wide inputs (not their recipes' 128)."""
        from qwen3_compile.quantize.stage import QuantizedArtifact

        out = self.root / preset / (f"q-{recipe}" + (f"-{dtype}" if dtype else ""))

        def make():
            from qwen3_compile.quantize.recipe import load_recipe, with_group_size, with_kv_cache
            from qwen3_compile.quantize.stage import quantize_artifact

            base, _, kv = recipe.partition("+kv-")  # "int8-wo+kv-fp8": the recipe with --kv-cache fp8
            chosen = with_kv_cache(load_recipe(base), kv) if kv else load_recipe(base)
            if chosen.weights.granularity == "per_group":
                chosen = with_group_size(chosen, 32)
            # the fp16 baseline recipe reads fp16 exports, quantizing recipes fp32 ones
            source = self.export(preset, dtype or ("fp16" if chosen.weights.dtype == "fp16" else "fp32"))
            quantize_artifact(source, chosen, out)

        key = (preset, f"recipe:{recipe}" + (f":{dtype}" if dtype else ""))
        return self.once(key, out, make, QuantizedArtifact.from_folder)

    def quantized(self, preset: str, recipe: str, dtype: str | None = None) -> Path:
        """The folder of `quantized_artifact`."""
        return self.quantized_artifact(preset, recipe, dtype).directory


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """The shared, read-only artifacts of the tiny presets (see `Artifacts`)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' base temps (pytest-N/popen-gwK) share pytest-N
        root = tmp_path_factory.getbasetemp().parent / "shared-artifacts"
        root.mkdir(exist_ok=True)
    else:
        root = tmp_path_factory.mktemp("shared-artifacts")
    shared = Artifacts(root)
    yield shared
    changed = shared.check_unchanged()
    assert not changed, "a test modified a shared artifact (copy it first): " + "; ".join(changed)


@pytest.fixture
def artifact_copy(tmp_path):
    """artifact_copy(folder) -> a writable copy of a shared artifact folder, for a test that edits it."""

    def copy(folder: Path) -> Path:
        dst = tmp_path / f"copy-{Path(folder).name}"
        shutil.copytree(folder, dst)
        return dst

    return copy


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
