"""Open a `build` folder's plan on the TensorRT flavour it was built with (needs a GPU of its target)."""

from __future__ import annotations

from pathlib import Path

from qwen3_compile.backends.base import CausalLMRunner
from qwen3_compile.backends.tensorrt.shim import flavour
from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.manifests import EngineManifest, Manifest


def load_tensorrt_runner(folder: Path, manifest: Manifest, backend: str) -> CausalLMRunner:
    trt = flavour(backend)
    if not trt.available():
        raise BadInputError(
            f"the {backend} backend is not installed.", field="--backend", fix=trt.install + "."
        )
    built_with = manifest.tensorrt.flavour if isinstance(manifest, EngineManifest) else None
    if built_with != backend:
        raise BadInputError(
            f"the {backend} backend runs engines built for it by `qwen3-compile build`; this is a "
            f"'{manifest.stage}' artifact" + (f" built with {built_with}" if built_with else "") + ".",
            file=folder / "manifest.json",
            field="--backend",
            fix=f"build it for a {backend} target (`qwen3-compile build ARTIFACT --target T -o DIR`) and "
            "validate DIR on a GPU of that target, or validate the ONNX artifact with --backend ort.",
        )
    if manifest.options.logits == "last":
        raise BadInputError(
            "this engine was built with --logits last (the deployment graph): it has no logits for the "
            "earlier positions validation compares.",
            file=folder / "manifest.json",
            field="options.logits",
            fix="validate an engine built with --logits all (the default); deploy the --logits last one.",
        )
    from qwen3_compile.backends.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(folder, manifest)
