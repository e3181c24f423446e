"""The ONNX Runtime runner's two ways of feeding a session, checked on the CPU provider: IO binding (what the
`ort-cuda` backend always uses: the KV cache stays as OrtValues where ORT wrote it) computes exactly what
plain `session.run` does; and the `ort-cuda` backend refuses clearly (exit code 2, the fix named) where
ONNX Runtime cannot run on CUDA. The CUDA runs themselves are in test_ort_cuda.py (marked gpu)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from qwen3_compile.backends.base import generate, left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.backends.onnxruntime.settings import (
    CUDA_PROVIDER,
    check_session_device,
    execution_providers,
)
from qwen3_compile.backends.registry import BACKENDS, ORT_DEVICES
from qwen3_compile.cli import main
from qwen3_compile.cli.common import BACKEND_CHOICES
from qwen3_compile.errors import BadInputError
from qwen3_compile.tokenizer import ENDOFTEXT_ID

PROMPTS = [[9707, 11, 1879, 0, 151644, 872, 198], [151644, 77091, 198, 3838]]  # different lengths: padding


@pytest.fixture(scope="module", params=["tiny-dense fp16", "tiny-moe fp32", "tiny-moe lowered"])
def model_path(request, artifacts):
    preset, kind = request.param.split()
    if kind == "lowered":
        return artifacts.lowered(preset).model_path
    return artifacts.export(preset, kind) / "model.onnx"


def test_io_binding_computes_what_session_run_computes(model_path):
    """Same session settings, same kernels: bit-identical logits, greedy tokens, cache contents."""
    batch = left_padded_batch(PROMPTS, ENDOFTEXT_ID)
    plain = generate(OrtRunner(model_path), batch, 6)
    bound = generate(OrtRunner(model_path, io_binding=True), batch, 6)
    assert np.array_equal(plain.prefill_logits, bound.prefill_logits)
    assert all(np.array_equal(a, b) for a, b in zip(plain.step_logits, bound.step_logits, strict=True))
    assert np.array_equal(plain.tokens, bound.tokens)


def test_io_binding_cache_is_ortvalues_that_grow_in_place(model_path):
    runner = OrtRunner(model_path, io_binding=True)
    plain = OrtRunner(model_path)
    batch = left_padded_batch(PROMPTS, ENDOFTEXT_ID)
    cache = runner.empty_cache(2)
    assert len(cache) == 2 * runner.num_layers
    assert all(
        isinstance(v, ort.OrtValue) and v.shape() == [2, runner.kv_heads, 0, runner.head_dim] for v in cache
    )
    logits, cache = runner.forward(batch.input_ids, batch.attention_mask, batch.position_ids, cache)
    _, expected = plain.forward(
        batch.input_ids, batch.attention_mask, batch.position_ids, plain.empty_cache(2)
    )
    width = batch.input_ids.shape[1]
    assert logits.dtype == np.float32 and logits.shape[:2] == (2, width)
    for value, array in zip(cache, expected, strict=True):
        assert isinstance(value, ort.OrtValue) and value.device_name() == "cpu"
        assert value.shape() == [2, runner.kv_heads, width, runner.head_dim]
        assert np.array_equal(value.numpy(), array)
    step = np.array([[11], [12]], dtype=np.int64)
    mask = np.concatenate([batch.attention_mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    _, cache = runner.forward(step, mask, batch.position_ids[:, -1:] + 1, cache)
    assert cache[0].shape()[2] == width + 1


def test_cpu_default_runs_session_run_with_numpy_cache(model_path):
    runner = OrtRunner(model_path)
    assert not runner.io_binding and runner.device == "cpu"
    assert isinstance(runner.empty_cache(1)[0], np.ndarray)
    assert runner.provider_options.keys() == {"CPUExecutionProvider"}


def test_execution_providers():
    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    cuda, cpu = execution_providers("cuda")
    # TF32 off: fp32 graphs are held to the fp32 reference (it flips near-tied router choices)
    assert cuda == (CUDA_PROVIDER, {"device_id": "0", "use_tf32": "0"}) and cpu == "CPUExecutionProvider"
    assert execution_providers("cuda", {"use_tf32": "1"})[0][1]["use_tf32"] == "1"
    with pytest.raises(ValueError, match="not one of"):
        execution_providers("tpu")


def test_backend_names_are_the_registry_s():
    assert BACKEND_CHOICES == tuple(BACKENDS)
    assert ORT_DEVICES == {"ort": "cpu", "ort-cuda": "cuda"}


class _FellBack:
    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_a_cuda_session_that_fell_back_to_the_cpu_is_an_error():
    """ORT creates the session on the CPU, with a log line, when the CUDA provider cannot load."""
    check_session_device(_FellBack(), "cpu", "model.onnx")
    with pytest.raises(BadInputError, match="fell back to CPUExecutionProvider") as err:
        check_session_device(_FellBack(), "cuda", "model.onnx")
    assert err.value.exit_code == 2 and "--backend ort" in err.value.fix


@pytest.fixture
def cpu_only_ort(monkeypatch):
    """This ONNX Runtime as the CPU package reports itself (whatever is installed here)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


@pytest.mark.parametrize("command", ["validate", "run"])
def test_ort_cuda_without_onnxruntime_gpu_exits_2_naming_the_fix(command, cpu_only_ort, artifacts):
    folder = artifacts.export("tiny-moe")
    args = ["--reference", "tiny-moe"] if command == "validate" else ["--prompt", "hi", "--greedy"]
    result = CliRunner().invoke(main, [command, str(folder), *args, "--backend", "ort-cuda"])
    assert result.exit_code == 2, result.output
    assert "has no CUDAExecutionProvider" in result.stderr
    assert "onnxruntime-gpu" in result.stderr and "--backend ort" in result.stderr


def test_run_takes_the_backend_option(artifacts):
    folder = artifacts.export("tiny-moe")
    args = ["run", str(folder), "--prompt", "hi", "--greedy", "--max-new-tokens", "3", "--json"]
    result = CliRunner().invoke(main, [*args, "--backend", "ort"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, [*args, "--backend", "tensorrt"])
    assert result.exit_code == 2 and "TensorRT" in result.stderr
