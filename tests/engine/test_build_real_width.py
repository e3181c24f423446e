"""Real-width builds (slow): Qwen3-30B-A3B's MoE layer (2048 hidden, 128 experts x 768, top-8) lowered to the
qmoe plugin node, and a Qwen3-0.6B slice, both built by TensorRT-RTX on the CPU. Sizes, times and peak RSS
of these builds: `python3 benchmarks/bench_build.py --models qwen3-30b-a3b --layers 1,2 --inputs fp16-export`
(README, TensorRT engines)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt_rtx"),
]


def _cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3_compile.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(
    "preset, layers, lowering",
    [("qwen3-30b-a3b", 1, "plugin"), ("qwen3-0.6b", 2, "none")],
)
def test_real_width_slice_builds(tmp_path, preset, layers, lowering):
    import json

    _cli("export", preset, "--layers", layers, "--dtype", "fp16", "-o", tmp_path / "onnx")
    _cli(
        "build", tmp_path / "onnx", "--target", "rtx-blackwell", "--max-seq", 4096, "-o", tmp_path / "engine"
    )
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert manifest["moe"]["lowering"] == lowering
    if lowering == "plugin":
        assert manifest["op_histogram"]["trt.plugins::Qwen3MoE"] == layers
    weights = sum(f.stat().st_size for f in (tmp_path / "onnx").glob("model.onnx*"))
    assert manifest["engine"]["bytes"] > 0.9 * weights  # every weight went into the plan
