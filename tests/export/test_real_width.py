"""Slow job: 2-layer real-width slices of Qwen3-30B-A3B (128 experts, top-8) and Qwen3-0.6B.

Run with `python3 -m pytest -m slow`. The 30B-A3B slice is 1.8B parameters (7.3 GB in fp32).
"""

from __future__ import annotations

import gc

import pytest

from qwen3_compile.export.stage import ExportOptions, export_onnx
from qwen3_compile.models.loading import load_model
from qwen3_compile.parity import ParityGates, check_parity, parity_prompts, reference_run
from qwen3_compile.runtime.onnxruntime_runner import OrtRunner
from qwen3_compile.runtime.torch_reference import TorchRunner
from qwen3_compile.tokenizer import load_tokenizer


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, target", [("qwen3-0.6b", None), ("qwen3-30b-a3b", "ort"), ("qwen3-30b-a3b", None)]
)
def test_real_width_slice_parity(preset, target, tmp_path):
    ids, modes = parity_prompts(load_tokenizer())
    ids, modes = (
        ids[:4],
        modes[:4],
    )  # two prompts, both modes: keeps the dense-expert function body affordable
    artifact = export_onnx(preset, tmp_path / "onnx", ExportOptions(target=target), num_layers=2)
    gc.collect()
    # the reference runs first and is freed: a 2-layer 30B-A3B slice is 7.3 GB in fp32 on each side
    reference = reference_run(TorchRunner(load_model(preset, num_layers=2)), ids, decode_steps=32)
    gc.collect()
    report = check_parity(
        reference, OrtRunner(artifact.model_path), ids, modes, decode_steps=32, gates=ParityGates()
    )
    assert report.prefill_max_abs <= 1e-4, report.to_dict()
    assert report.prefill_top1 == 1.0
    assert report.greedy_identical == len(ids), report.greedy_match_lengths
