from __future__ import annotations

import pytest

from qwen3_compile.export.stage import ExportOptions, export_onnx
from qwen3_compile.models.loading import load_model


@pytest.fixture(scope="session")
def loaded_presets():
    return {name: load_model(name) for name in ("tiny-dense", "tiny-moe")}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, loaded_presets):
    """(preset, graph kind) -> ExportedArtifact; graph kind is 'canonical' or 'ort'."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, loaded in loaded_presets.items():
        out[name, "canonical"] = export_onnx(loaded, root / name / "canonical")
        out[name, "ort"] = export_onnx(loaded, root / name / "ort", ExportOptions(target="ort"))
    return out
