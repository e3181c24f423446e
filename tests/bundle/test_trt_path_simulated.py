"""The runner's TensorRT path against a simulated TensorRT runtime and CUDA memory (fake_tensorrt.py): the
profile chosen per call, shapes inside it, the KV cache moved between calls on the "device", the last
logits row copied back, device buffers allocated once (not per step) and none leaked. Its greedy tokens
equal the validated reference's. This checks the runner's bookkeeping only; TensorRT itself is not
involved (no engine can run here)."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout

import onnxruntime as ort
import pytest

from qwen3_compile.bundle.archive import safe_extract

from .device_files import load_device_module
from .fake_tensorrt import FakeCuda, fake_tensorrt_module


@pytest.mark.parametrize("built_by", ["build_engine", "trtexec"])
def test_trt_path_bookkeeping_reproduces_the_reference_tokens(bundled, built_by, tmp_path, monkeypatch):
    """build_engine.py builds the manifest's three profiles, the README's trtexec line the chunked one."""
    folder = tmp_path / "device"
    safe_extract(bundled.archive, folder)
    (folder / "engine").mkdir()
    (folder / "engine" / "model.plan").write_bytes(b"simulated")
    manifest = bundled.manifest
    cuda = FakeCuda()
    session = ort.InferenceSession(str(folder / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    profiles = manifest["profiles"]
    if built_by == "trtexec":
        profiles = [p for p in profiles if p["name"] == "chunked"]
    trt = fake_tensorrt_module(session, profiles, cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.syspath_prepend(str(folder))
    for name in ("runner", "trt_backend", "bundle_files"):  # the bundle's own copies
        monkeypatch.delitem(sys.modules, name, raising=False)
    runner = load_device_module(folder / "runner.py", "runner")
    monkeypatch.setattr(sys.modules["trt_backend"], "CudaRuntime", lambda: cuda)

    smoke = manifest["smoke_reference"]
    steps = smoke["max_new_tokens"]
    out = io.StringIO()
    with redirect_stdout(out):
        code = runner.main(
            ["chat", "--backend", "trt", "--no-think", "--greedy", "--json", "--max-new-tokens", str(steps)]
            + ["-p", smoke["prompt"], "--bundle", str(folder)]
        )
    assert code == 0
    result = json.loads(out.getvalue())
    assert result["backend"] == "trt"
    assert result["prompt_ids"] == smoke["modes"]["non-thinking"]["prompt_ids"]
    assert result["generated_ids"] == smoke["modes"]["non-thinking"]["tokens"]

    context = trt.engines[0].contexts[0]
    used = [profiles[i]["name"] for i in context.profiles_used]
    expected = ["prefill", "decode"] if built_by == "build_engine" else ["chunked"]
    assert used == expected  # switched once per phase, then kept
    layers = manifest["architecture"]["num_hidden_layers"]
    # Allocated once, whatever the number of steps: 3 inputs, two buffers per KV tensor, the logits; all
    # freed by close() at the end (a double free or an unknown pointer raises in FakeCuda.free).
    assert cuda.mallocs == 3 + 2 * 2 * layers + 1
    assert not cuda.buffers
    kv_len = len(result["prompt_ids"]) + len(result["generated_ids"]) - 1
    key = context.shapes["past_key_values.0.key"]
    assert key[2] == kv_len - 1  # the last call's past: every token but the one it fed
