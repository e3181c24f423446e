"""Jetson deployment bundles: `bundle_artifact` writes one reproducible .tar.gz (lowered ONNX, plugin
sources, device scripts, runner, tokenizer, manifest), `verify_bundle` checks one.

The stage's imports (onnx, the build stage) load on first use, so the CLI's `--help` stays fast.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Bundle": "qwen3_compile.bundle.stage",
    "bundle_artifact": "qwen3_compile.bundle.stage",
    "VerifiedBundle": "qwen3_compile.bundle.verify",
    "verify_bundle": "qwen3_compile.bundle.verify",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
