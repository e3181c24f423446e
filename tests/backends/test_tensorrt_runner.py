"""The TensorRT runner: refusals everywhere; engine execution only on a GPU the plan targets (marked gpu).

No engine runs on the CPU machine, and TensorRT-RTX 1.7.1 has no SM 9.0 (the H200 of the device machine),
so the gpu test skips there too unless standard TensorRT is installed: it never reports a run that did not
happen."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from qwen3_compile.backends.registry import open_runner
from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.manifest import read_manifest


@pytest.fixture(scope="module")
def export_dir(artifacts):
    return artifacts.export("tiny-dense", "fp16")


def test_runner_refuses_non_engine_folders(export_dir):
    from qwen3_compile.backends.tensorrt.runner import TensorRTRunner

    with pytest.raises(BadInputError, match="'export' artifact"):
        TensorRTRunner(export_dir, read_manifest(export_dir))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt_rtx")
def test_validate_backend_needs_an_engine_of_its_flavour(export_dir, tmp_path):
    manifest = read_manifest(export_dir)
    with pytest.raises(BadInputError, match="engines built for it by `qwen3-compile build`"):
        open_runner(export_dir, manifest, "tensorrt-rtx")
    built_elsewhere = _engine_manifest(manifest, flavour="tensorrt")
    with pytest.raises(BadInputError, match="built with tensorrt"):
        open_runner(tmp_path, built_elsewhere, "tensorrt-rtx")


def _engine_manifest(export, flavour: str):
    """An engine manifest for `export`'s graph as a build for `flavour` would record it (no plan needed:
    the refusal comes first)."""
    from qwen3_compile.storage.manifests import (
        EngineManifest,
        EngineOptions,
        MemoryRecord,
        MoeRecord,
        PlanRecord,
        SourceRecord,
        TargetRecord,
        TensorRTRecord,
    )

    return EngineManifest(
        tools={},
        outputs={},
        timings_s={},
        inputs=SourceRecord(artifact="export", stage="export", model_sha256="0" * 64),
        options=EngineOptions(
            dtype="fp16", opset=21, max_positions=4096, target="h200", max_batch=1, max_seq=128
        ),
        architecture=export.architecture,
        tensorrt=TensorRTRecord(flavour=flavour, module=flavour.replace("-", "_"), version="10.16"),
        target=TargetRecord(name="h200", sm="9.0", description="H200"),
        profiles=(),
        moe=MoeRecord(lowering="none"),
        attention="decomposed",
        lowering={},
        op_histogram={},
        memory=MemoryRecord(weights=0, kv_cache=0, activations=0, usable=1, total=0, fits=True),
        engine=PlanRecord(file="model.plan", bytes=0, build_s=0.0),
    )


def _gpu_target():
    """A target whose SM is this GPU's and whose TensorRT flavour is importable, else skip with why."""
    import torch

    from qwen3_compile.targets import all_targets

    major, minor = torch.cuda.get_device_capability()
    sm = f"{major}.{minor}"
    for target in all_targets().values():
        module = "tensorrt_rtx" if target.tensorrt == "tensorrt-rtx" else "tensorrt"
        if target.sm == sm and importlib.util.find_spec(module) is not None:
            return target
    pytest.skip(
        f"no installed TensorRT flavour has a target for this GPU (SM {sm}); TensorRT-RTX 1.7.1 "
        "builds for SM 7.5-8.9 and 12.x only"
    )


@pytest.mark.gpu
def test_engine_matches_onnxruntime(export_dir, tmp_path):
    from qwen3_compile.backends.base import generate, left_padded_batch
    from qwen3_compile.backends.onnxruntime.runner import OrtRunner
    from qwen3_compile.backends.tensorrt.runner import TensorRTRunner
    from qwen3_compile.engine import BuildOptions, build_engine

    target = _gpu_target()
    built = build_engine(export_dir, BuildOptions(target.name, max_batch=2, max_seq=256), tmp_path / "engine")
    runner = TensorRTRunner(built.directory)
    rng = np.random.default_rng()
    batch = left_padded_batch([list(rng.integers(0, 151000, size=n)) for n in (9, 4)], pad_id=151643)
    expected = generate(OrtRunner(export_dir / "model.onnx"), batch, steps=8)
    # Teacher forcing: the engine is fed ONNX Runtime's greedy tokens, so every decode step compares the
    # same prefix (the decode profile, the profile switch and the KV cache round trip are all exercised).
    got = generate(runner, batch, steps=8, forced=expected.tokens)
    mask = batch.attention_mask.astype(bool)
    # fp16 graph, fp16 engine: logits have std ~8 on the random preset
    assert np.abs(got.prefill_logits[mask] - expected.prefill_logits[mask]).max() < 0.1
    assert (got.prefill_logits[mask].argmax(-1) == expected.prefill_logits[mask].argmax(-1)).mean() > 0.99
    for step, (g, e) in enumerate(zip(got.step_logits, expected.step_logits, strict=True)):
        assert np.abs(g - e).max() < 0.1, f"decode step {step}"
    runner.close()
