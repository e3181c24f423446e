from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def loaded_presets(artifacts):
    return {name: artifacts.loaded(name) for name in ("tiny-dense", "tiny-moe")}


@pytest.fixture(scope="session")
def exported(artifacts):
    """(preset, graph kind) -> the export ('canonical') or its `lower --for ort` copy ('ort'); shared."""
    return {
        (name, kind): artifacts.exported(name) if kind == "canonical" else artifacts.lowered(name)
        for name in ("tiny-dense", "tiny-moe")
        for kind in ("canonical", "ort")
    }
