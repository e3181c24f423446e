"""The `ort-cuda` backend on a GPU: the tiny presets' artifacts on ONNX Runtime's CUDA provider against the
PyTorch reference (both reasoning modes, left-padded batch, greedy decode through the device-resident KV
cache), and the `validate --backend ort-cuda` command. Needs a CUDA GPU and onnxruntime-gpu (the device
machine: shared/DEVICE.md); skipped elsewhere. The 2-layer Qwen3-30B-A3B slice runs in
benchmarks/ort_cuda.py (docs/benchmarks.md, ONNX Runtime on CUDA)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.backends.registry import open_runner
from qwen3_compile.backends.torch_reference import TorchRunner
from qwen3_compile.cli import main
from qwen3_compile.parity import ParityGates, check_parity, parity_prompts
from qwen3_compile.storage.manifest import read_manifest
from qwen3_compile.tokenizer import load_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs onnxruntime-gpu (CUDAExecutionProvider); see shared/DEVICE.md",
    ),
]

CASES = ["tiny-dense fp32", "tiny-dense fp16", "tiny-moe fp32", "tiny-moe fp16", "tiny-moe lowered"]


def _folder(artifacts, case: str):
    preset, kind = case.split()
    return artifacts.lowered(preset).directory if kind == "lowered" else artifacts.export(preset, kind)


def _cuda_runner(folder):
    return open_runner(folder, read_manifest(folder), "ort-cuda")


@pytest.fixture(scope="module")
def prompts():
    return parity_prompts(load_tokenizer())


@pytest.mark.parametrize("case", CASES)
def test_parity_against_pytorch(case, artifacts, prompts):
    """fp32 (TF32 off) is held to the CPU's fp32 gates; fp16 to the fp16 export's stated gates
    (tests/export/test_parity.py: top-1, dense max error 0.1, MoE mean error 0.05)."""
    preset, kind = case.split()
    dtype = "fp16" if kind == "fp16" else "fp32"
    ids, modes = prompts
    report = check_parity(
        TorchRunner(artifacts.loaded(preset)),
        _cuda_runner(_folder(artifacts, case)),
        ids,
        modes,
        decode_steps=16,
        gates=ParityGates.for_dtype(dtype),
    )
    assert report.passed, report.to_dict()
    assert report.modes == ["non-thinking", "thinking"]
    if dtype == "fp32":
        assert report.prefill_max_abs <= 1e-4, report.to_dict()
    else:
        assert report.prefill_mean_abs <= 0.05, report.to_dict()
        if preset == "tiny-dense":
            assert report.prefill_max_abs <= 0.1, report.to_dict()


def test_kv_cache_stays_on_the_gpu(artifacts):
    runner = _cuda_runner(artifacts.export("tiny-moe", "fp16"))
    assert runner.io_binding and runner.provider_options["CUDAExecutionProvider"]["use_tf32"] == "0"
    cache = runner.empty_cache(1)
    ids = np.array([[151644, 872, 198, 9707]], dtype=np.int64)
    logits, cache = runner.forward(ids, np.ones_like(ids), np.arange(4)[None], cache)
    for step in range(3):
        token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        mask = np.ones((1, 5 + step), dtype=np.int64)
        logits, cache = runner.forward(token, mask, np.array([[4 + step]]), cache)
    assert logits.shape == (1, 1, 151936) and logits.dtype == np.float32
    assert all(v.device_name() == "cuda" and v.shape()[2] == 7 for v in cache)
    assert all(v.data_type() == "tensor(float16)" for v in cache)


def test_cuda_agrees_with_cpu(artifacts, prompts):
    """Same fp32 graph, two providers: the CUDA kernels differ from the CPU's by summation order only."""
    from qwen3_compile.backends.base import generate, left_padded_batch
    from qwen3_compile.tokenizer import ENDOFTEXT_ID

    folder = artifacts.lowered("tiny-moe").directory
    batch = left_padded_batch(prompts[0], ENDOFTEXT_ID)
    cpu = generate(open_runner(folder, read_manifest(folder), "ort"), batch, 8)
    gpu = generate(_cuda_runner(folder), batch, 8)
    real = batch.attention_mask.astype(bool)
    assert np.abs(cpu.prefill_logits[real] - gpu.prefill_logits[real]).max() <= 1e-4
    assert np.array_equal(cpu.tokens, gpu.tokens)


def test_validate_command_on_ort_cuda(artifacts, tmp_path):
    """The lowered graph (com.microsoft::MoE) under the fp32 gates, bisection on the GPU too."""
    folder = artifacts.lowered("tiny-moe").directory
    out = tmp_path / "report"
    args = ["validate", str(folder), "--reference", "tiny-moe", "--backend", "ort-cuda"]
    result = CliRunner().invoke(main, [*args, "--long-context-tokens", "300", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "ort-cuda" and report["passed"]
    assert report["backend_settings"]["device"] == "cuda"
    assert report["backend_settings"]["providers"]["CUDAExecutionProvider"]["use_tf32"] == "0"
    assert report["bisection"] is not None and report["bisection"]["first_diverging_layer"] is None


def test_reference_on_the_gpu_equals_the_cpu_reference(artifacts, prompts):
    """`validate --reference-device cuda`: the fp32 PyTorch model on the GPU (TF32 off) gives the CPU
    reference's logits to summation order."""
    from qwen3_compile.backends.base import generate, left_padded_batch
    from qwen3_compile.backends.torch_reference import require_reference_device
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.tokenizer import ENDOFTEXT_ID

    require_reference_device("cuda")
    batch = left_padded_batch(prompts[0][:4], ENDOFTEXT_ID)
    cpu = generate(TorchRunner(artifacts.loaded("tiny-moe")), batch, 8)
    gpu = generate(TorchRunner(load_model("tiny-moe", device="cuda")), batch, 8)
    real = batch.attention_mask.astype(bool)
    assert np.abs(cpu.prefill_logits[real] - gpu.prefill_logits[real]).max() <= 1e-4
    assert np.array_equal(cpu.tokens, gpu.tokens)


def test_validate_with_the_reference_on_the_gpu(artifacts, tmp_path):
    folder = artifacts.export("tiny-moe", "fp16")
    out = tmp_path / "report"
    args = ["validate", str(folder), "--reference", "tiny-moe", "--backend", "ort-cuda"]
    args += ["--reference-device", "cuda", "--long-context-tokens", "300", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["reference_device"] == "cuda" and report["passed"]
    assert "PyTorch fp32 on cuda" in (out / "report.md").read_text()


def test_captured_decode_picks_the_greedy_token_on_the_device(artifacts, tmp_path):
    """tiny-moe fp16 lowered with --attention gqa --logits last on a static cache: the greedy token picked
    in the graph (replayed from a CUDA graph, only the token copied back) equals numpy's argmax of the host
    logits from the same captured graph and from the uncaptured one, token for token."""
    from qwen3_compile.generation.loop import generate_reply
    from qwen3_compile.generation.sampling import Sampler, SamplingConfig
    from qwen3_compile.lower.stage import lower_artifact

    source = artifacts.export("tiny-moe", "fp16")
    model = lower_artifact(source, tmp_path / "last", "ort", attention="gqa", logits="last").model_path
    prompt = np.random.default_rng().integers(0, 151643, size=40).tolist()
    on_host = lambda x: int(x.argmax())  # noqa: E731
    plain = OrtRunner(model, device="cuda", static_cache_length=128)
    captured = OrtRunner(model, device="cuda", static_cache_length=128, enable_cuda_graph=True)
    assert captured.greedy
    expected = generate_reply(plain, prompt, 48, on_host, stop_ids=()).generated_ids
    on_device = generate_reply(captured, prompt, 48, Sampler(SamplingConfig(greedy=True)), stop_ids=())
    assert on_device.generated_ids == expected
    assert generate_reply(captured, prompt, 48, on_host, stop_ids=()).generated_ids == expected
    assert captured._captured is not None  # the decode steps were replayed
