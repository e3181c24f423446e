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
