from __future__ import annotations

import pytest

from qwen3_compile.export.stage import export_onnx
from qwen3_compile.lower.stage import lower_artifact
from qwen3_compile.models.loading import load_model


@pytest.fixture(scope="session")
def loaded_presets():
    return {name: load_model(name) for name in ("tiny-dense", "tiny-moe")}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, loaded_presets):
    """(preset, graph kind) -> the export ('canonical') or its `lower --for ort` copy ('ort')."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, loaded in loaded_presets.items():
        out[name, "canonical"] = export_onnx(loaded, root / name / "canonical")
        out[name, "ort"] = lower_artifact(out[name, "canonical"].directory, root / name / "ort", "ort")
    return out
