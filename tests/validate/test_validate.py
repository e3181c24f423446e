"""Validation: an exported tiny-moe passes; damaged copies fail and the report names the first diverging
layer; both reasoning modes in every report; bad input refused with exit code 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError
from qwen3_compile.tokenizer import EMPTY_THINK_BLOCK
from qwen3_compile.validate.stage import validate_artifact

FAST = {"decode_steps": 8, "long_context_tokens": 600}
FEW_PROMPTS = [
    '"Explain rotary embeddings."',
    '{"prompt": "写一首关于秋天的诗。"}',
    '{"prompt": "def f(x): return"}',
]


@pytest.fixture
def few_prompts(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(FEW_PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def artifact(artifacts):
    return artifacts.lowered("tiny-moe").directory


def damaged_copy(artifact, tmp_path, edit, reseal):
    """A copy of the artifact with `edit(name -> array)` applied to its initializers (manifest resealed:
    a producer that wrote wrong weights)."""
    out = tmp_path / "damaged"
    shutil.copytree(artifact, out)
    model = onnx.load(out / "model.onnx")
    weights = {t.name: t for t in model.graph.initializer}
    for name, array in edit({n: numpy_helper.to_array(t) for n, t in weights.items()}).items():
        weights[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
    onnx.save(model, out / "model.onnx")
    return reseal(out)


def test_exported_artifact_passes(artifact, artifacts, tmp_path):
    report = validate_artifact(artifact, artifacts.loaded("tiny-moe"), output=tmp_path / "report", **FAST)
    assert report.passed, report.failures
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["passed"] and data["modes"] == ["non-thinking", "thinking"]
    assert data["reference_device"] == "cpu"
    assert {c["category"] for c in data["cases"]} >= {
        "multilingual",
        "code",
        "json",
        "tool-call",
        "math",
        "long-context",
    }
    assert data["summary"]["prefill"]["top1"] == 1.0 and data["summary"]["greedy_match_fraction"] == 1.0
    assert data["bisection"]["first_diverging_layer"] is None
    for case in report.cases:
        if case.case.mode == "non-thinking":
            assert case.case.ids[-4:] == EMPTY_THINK_BLOCK
    for name in ("report.md", "per_prompt.png", "per_position.png", "per_layer.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "non-thinking" in markdown
    assert data["environment"]["packages"]["onnxruntime"] == onnxruntime.__version__
    assert f"onnxruntime {onnxruntime.__version__}" in markdown


def test_perturbed_weights_fail_at_their_layer(artifact, tmp_path, few_prompts, reseal):
    rng = np.random.default_rng()

    def perturb(weights):
        w = weights["model.layers.1.self_attn.o_proj.weight.T"].copy()
        rows, cols = rng.integers(0, w.shape[0], 8), rng.integers(0, w.shape[1], 8)
        w[rows, cols] += 5.0
        return {"model.layers.1.self_attn.o_proj.weight.T": w}

    damaged = damaged_copy(artifact, tmp_path, perturb, reseal)
    report = validate_artifact(damaged, "tiny-moe", output=tmp_path / "r", prompts=few_prompts, **FAST)
    assert not report.passed
    assert report.bisection.first_diverging_layer == 1
    assert report.bisection.layer_errors[0] < 1e-5 < report.bisection.layer_errors[1]
    assert "first divergence: layer 1" in report.failures
    assert (
        "First layer above the relative-error tolerance 0.001: 1."
        in (tmp_path / "r" / "report.md").read_text()
    )


def test_swapped_expert_fails_at_layer_0(artifact, tmp_path, few_prompts, reseal):
    def swap(weights):
        out = {}
        for name in (
            "model.layers.0.mlp.experts.gate_up_proj.interleaved",
            "model.layers.0.mlp.experts.down_proj",
        ):
            w = weights[name].copy()
            w[[3, 7]] = w[[7, 3]]
            out[name] = w
        return out

    damaged = damaged_copy(artifact, tmp_path, swap, reseal)
    result = CliRunner().invoke(
        main,
        [
            "validate",
            str(damaged),
            "--reference",
            "tiny-moe",
            "--decode-steps",
            "8",
            "--long-context-tokens",
            "0",
            "--prompts",
            str(few_prompts),
            "--json",
        ],
    )
    assert result.exit_code == 1, result.output
    data = json.loads(result.output[result.output.index("{") :])
    assert data["bisection"]["first_diverging_layer"] == 0
    assert not data["passed"]


def test_missing_manifest(artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    (copy / "manifest.json").unlink()
    result = CliRunner().invoke(main, ["validate", str(copy), "--reference", "tiny-moe"])
    assert result.exit_code == 2 and "manifest.json" in result.output


def test_reference_mismatch(artifact):
    with pytest.raises(BadInputError) as info:
        validate_artifact(artifact, "tiny-dense", **FAST)
    assert info.value.field.startswith("architecture.") and "manifest.json" in info.value.file


def test_backend_not_installed(artifact):
    result = CliRunner().invoke(
        main, ["validate", str(artifact), "--reference", "tiny-moe", "--backend", "tensorrt"]
    )
    assert result.exit_code == 2
    assert "not installed" in result.output or "not available yet" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_reference_device_cuda_without_a_gpu_is_refused(artifact, tmp_path):
    out = tmp_path / "report"
    args = ["validate", str(artifact), "--reference", "tiny-moe", "--reference-device", "cuda"]
    args += ["-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "--reference-device" in result.output and "no CUDA GPU" in result.output
    assert not out.exists()  # refused before anything is written


def test_prompt_file_bad_json(artifact, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "broken",\n')
    result = CliRunner().invoke(
        main, ["validate", str(artifact), "--reference", "tiny-moe", "--prompts", str(prompts)]
    )
    assert result.exit_code == 2 and "line 2" in result.output


def test_user_prompt_file(artifact, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"Say hi."\n{"messages": [{"role": "user", "content": "2+2?"}], "name": "sum"}\n')
    report = validate_artifact(
        artifact,
        "tiny-moe",
        prompts=prompts,
        output=tmp_path / "r",
        decode_steps=4,
        long_context_tokens=0,
        bisect=False,
    )
    assert report.passed and [c.case.name for c in report.cases] == ["line-1", "line-1", "sum", "sum"]
