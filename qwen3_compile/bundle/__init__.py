"""Jetson deployment bundles: `bundle_artifact` writes one reproducible .tar.gz (lowered ONNX, plugin
sources, device scripts, runner, tokenizer, manifest), `verify_bundle` checks one."""

from qwen3_compile.bundle.stage import Bundle, bundle_artifact
from qwen3_compile.bundle.verify import VerifiedBundle, verify_bundle

__all__ = ["Bundle", "VerifiedBundle", "bundle_artifact", "verify_bundle"]
