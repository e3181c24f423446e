"""Presets for the recipe-gate validations: tiny-moe (the harder one) in the default suite, tiny-dense in the
slow job (each validation runs the whole prompt suite)."""

import pytest

GATE_PRESETS = (pytest.param("tiny-dense", marks=pytest.mark.slow), "tiny-moe")
