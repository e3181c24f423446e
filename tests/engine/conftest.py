"""Artifacts the build tests share: canonical exports (fp32, fp16) and quantized folders, made once."""

from __future__ import annotations

from pathlib import Path

import pytest


class Artifacts:
    """Lazily exported / quantized folders, keyed by (preset, what)."""

    def __init__(self, root: Path):
        self.root = root
        self.made: dict[tuple[str, str], Path] = {}

    def export(self, preset: str, dtype: str = "fp32") -> Path:
        key = (preset, dtype)
        if key not in self.made:
            from qwen3_compile.export.stage import ExportOptions, export_onnx

            out = self.root / preset / dtype
            export_onnx(preset, out, ExportOptions(dtype=dtype))
            self.made[key] = out
        return self.made[key]

    def plugin_sized_moe(self, dtype: str = "fp16") -> Path:
        """An export of a small MoE whose shapes the qmoe kernels support (hidden 128, experts 8 x 64, top-2):
        tiny-moe's 64-wide layers are below the kernels' minimum, so its builds fall back to dense."""
        key = ("moe-128", dtype)
        if key not in self.made:
            import dataclasses

            import torch
            from transformers import AutoModelForCausalLM

            from qwen3_compile.export.stage import ExportOptions, export_onnx
            from qwen3_compile.models.presets import get_preset

            arch = dataclasses.replace(
                get_preset("tiny-moe").arch, hidden_size=128, moe_intermediate_size=64, num_experts=8, top_k=2
            )
            torch.manual_seed(0)
            checkpoint = self.root / "moe-128-checkpoint"
            AutoModelForCausalLM.from_config(arch.to_transformers_config()).save_pretrained(checkpoint)
            out = self.root / "moe-128" / dtype
            export_onnx(str(checkpoint), out, ExportOptions(dtype=dtype))
            self.made[key] = out
        return self.made[key]

    def quantized(self, preset: str, recipe: str) -> Path:
        key = (preset, f"recipe:{recipe}")
        if key not in self.made:
            from qwen3_compile.quantize.recipe import load_recipe
            from qwen3_compile.quantize.stage import quantize_artifact

            out = self.root / preset / f"q-{recipe}"
            # the fp16 baseline recipe reads fp16 exports, quantizing recipes fp32 ones
            source = self.export(preset, "fp16" if load_recipe(recipe).weights.dtype == "fp16" else "fp32")
            quantize_artifact(source, recipe, out)
            self.made[key] = out
        return self.made[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("build-inputs"))
