"""Open a `build` folder's plan on the TensorRT flavour it was built with (needs a GPU of its target)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen3_compile.backends.base import CausalLMRunner
from qwen3_compile.backends.tensorrt.shim import flavour
from qwen3_compile.errors import BadInputError


def load_tensorrt_runner(folder: Path, manifest: dict[str, Any], backend: str) -> CausalLMRunner:
    trt = flavour(backend)
    if not trt.available():
        raise BadInputError(
            f"the {backend} backend is not installed.", field="--backend", fix=trt.install + "."
        )
    built_with = (manifest.get("tensorrt") or {}).get("flavour")
    if manifest.get("stage") != "build" or built_with != backend:
        raise BadInputError(
            f"the {backend} backend runs engines built for it by `qwen3-compile build`; this is a "
            f"'{manifest.get('stage')}' artifact" + (f" built with {built_with}" if built_with else "") + ".",
            file=folder / "manifest.json",
            field="--backend",
            fix=f"build it for a {backend} target (`qwen3-compile build ARTIFACT --target T -o DIR`) and "
            "validate DIR on a GPU of that target, or validate the ONNX artifact with --backend ort.",
        )
    if (manifest.get("options") or {}).get("logits") == "last":
        raise BadInputError(
            "this engine was built with --logits last (the deployment graph): it has no logits for the "
            "earlier positions validation compares.",
            file=folder / "manifest.json",
            field="options.logits",
            fix="validate an engine built with --logits all (the default); deploy the --logits last one.",
        )
    from qwen3_compile.backends.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(folder, manifest)
