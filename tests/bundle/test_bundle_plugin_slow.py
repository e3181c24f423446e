"""Slow: a bundle whose graph has the TensorRT plugin node. A small MoE of kernel-supported shapes
(hidden 128, 8 experts x 64, top-2; tiny-moe's 64-wide layers fall back to dense) exported in fp16 and
validated, bundled for jetson-agx-orin and jetson-thor: the plugin lowering is chosen (Thor's TRT_MoE needs
TensorRT 10.16, above its minimum 10.13), the plugin sources and CMake ship, and the runner's ONNX Runtime
path (plugin nodes mapped back to the reference function) reproduces the validated artifact's greedy
tokens."""

from __future__ import annotations

import dataclasses
import json

import pytest

from .conftest import PROMPTS
from .test_bundle_end_to_end import reference_greedy, run_bundled_runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def validated_moe128(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.models.presets import get_preset
    from qwen3_compile.validate.stage import validate_artifact

    root = tmp_path_factory.mktemp("moe128")
    arch = dataclasses.replace(
        get_preset("tiny-moe").arch, hidden_size=128, moe_intermediate_size=64, num_experts=8, top_k=2
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(arch.to_transformers_config()).save_pretrained(root / "checkpoint")
    export_onnx(str(root / "checkpoint"), root / "fp16", ExportOptions(dtype="fp16"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    report = validate_artifact(
        root / "fp16",
        str(root / "checkpoint"),
        prompts=prompts,
        decode_steps=8,
        long_context_tokens=0,
        bisect=False,
    )
    assert report.passed, report.failures
    return root / "fp16"


@pytest.mark.parametrize("target", ["jetson-agx-orin", "jetson-thor"])
def test_plugin_bundle_runs_on_ort_through_the_reference_function(validated_moe128, target, tmp_path):
    from qwen3_compile.bundle import bundle_artifact, verify_bundle
    from qwen3_compile.bundle.archive import safe_extract
    from qwen3_compile.schema import encode

    result = bundle_artifact(validated_moe128, target, tmp_path / "b.tar.gz")
    m = encode(result.manifest)  # as the device reads it
    assert (
        m["moe"]["lowering"] == "plugin"
        and m["moe"]["plugin_library"] == "build/plugin/libqmoe_trt_plugin.so"
    )
    assert m["op_histogram"]["trt.plugins::Qwen3MoE"] == 2 and m["warnings"] == []
    if target == "jetson-thor":
        assert "TRT_MoE needs TensorRT >= 10.16" in m["moe"]["skipped"]["trt_moe"]
    assert {"plugins/moe/CMakeLists.txt", "plugins/moe/trt/qmoe_trt_plugin.cpp", "plugins/moe/qmoe.h"} <= set(
        m["files"]
    )
    assert "--dynamicPlugins=build/plugin/libqmoe_trt_plugin.so" in m["trtexec"]
    verify_bundle(result.path, trt_version=m["target"]["min_tensorrt"], sm=m["target"]["sm"])
    folder = tmp_path / "device"
    safe_extract(result.path, folder)
    arch = {"jetson-agx-orin": "87", "jetson-thor": "110"}[target]
    assert f'arch="${{1:-{arch}}}"' in (folder / "build_plugin.sh").read_text()
    steps = m["smoke_reference"]["max_new_tokens"]
    prompt_ids, expected = reference_greedy(validated_moe128, False, steps)
    assert m["smoke_reference"]["modes"]["non-thinking"]["tokens"] == expected
    run = run_bundled_runner(
        folder, "chat", "--backend", "ort", "--no-think", "--greedy", "--json",
        "--max-new-tokens", str(steps), "-p", m["smoke_reference"]["prompt"],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["plugin_nodes_mapped"] == 2
    assert out["prompt_ids"] == prompt_ids and out["generated_ids"] == expected
