"""Which runner executes an artifact for validation, by backend name. One place, no branches elsewhere."""

from __future__ import annotations

from pathlib import Path

from qwen3_compile.build.trt_import import flavour
from qwen3_compile.errors import BadInputError

BACKENDS = ("ort", "tensorrt", "tensorrt-rtx")


def artifact_runner(artifact: Path, manifest: dict, backend: str):
    if backend not in BACKENDS:
        raise BadInputError(
            f"unknown backend '{backend}'.", field="--backend", fix=f"use one of: {', '.join(BACKENDS)}."
        )
    if backend == "ort":
        # the same stage -> runner table `run` uses: export and quantize folders run on ONNX Runtime
        from qwen3_compile.generation.artifact import RUNNER_LOADERS

        ort_stages = sorted(stage for stage in RUNNER_LOADERS if stage != "build")
        loader = RUNNER_LOADERS.get(manifest.get("stage")) if manifest.get("stage") in ort_stages else None
        if loader is None:
            raise BadInputError(
                f"the ONNX Runtime backend runs {', '.join(ort_stages)} artifacts; this one is a "
                f"'{manifest.get('stage')}' artifact.",
                file=artifact / "manifest.json",
                field="stage",
                fix="pass a folder written by `qwen3-compile export`, `quantize` or `compile`.",
            )
        return loader(artifact, manifest)
    trt = flavour(backend)  # module names and install hints live with the TensorRT import (build/)
    if not trt.available():
        raise BadInputError(
            f"the {backend} backend is not installed.", field="--backend", fix=trt.install + "."
        )
    # TensorRT backends run plans written by `qwen3-compile build` for that flavour
    built_with = (manifest.get("tensorrt") or {}).get("flavour")
    if manifest.get("stage") != "build" or built_with != backend:
        raise BadInputError(
            f"the {backend} backend runs engines built for it by `qwen3-compile build`; this is a "
            f"'{manifest.get('stage')}' artifact" + (f" built with {built_with}" if built_with else "") + ".",
            file=artifact / "manifest.json",
            field="--backend",
            fix=f"build it for a {backend} target (`qwen3-compile build ARTIFACT --target T -o DIR`) and "
            "validate DIR on a GPU of that target, or validate the ONNX artifact with --backend ort.",
        )
    if (manifest.get("options") or {}).get("logits") == "last":
        raise BadInputError(
            "this engine was built with --logits last (the deployment graph): it has no logits for the "
            "earlier positions validation compares.",
            file=artifact / "manifest.json",
            field="options.logits",
            fix="validate an engine built with --logits all (the default); deploy the --logits last one.",
        )
    from qwen3_compile.runtime.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(artifact, manifest)
