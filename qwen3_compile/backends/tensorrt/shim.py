"""The one import shim for TensorRT: standard `tensorrt` or `tensorrt_rtx`, chosen by the target's flavour.

Both share one API shape (builder, strongly typed network, ONNX parser, optimisation profiles, plugin
registry). Polygraphy picks its flavour from `polygraphy.config.USE_TENSORRT_RTX` when its TensorRT
backend is first imported, so the shim sets that flag before anything imports Polygraphy's loaders, and
refuses a second flavour in the same process (Polygraphy would keep talking to the first).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType

from qwen3_compile.errors import BadInputError


@dataclass(frozen=True)
class Flavour:
    name: str  # as in recipes/targets/*.toml
    module: str
    package: str  # what provides the module
    install: str

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


FLAVOURS = {
    "tensorrt-rtx": Flavour(
        "tensorrt-rtx",
        "tensorrt_rtx",
        "tensorrt-rtx-cu13==1.7.1.116",
        "pip install 'qwen3-compile[rtx]' (that is tensorrt-rtx-cu13==1.7.1.116; it builds without a GPU)",
    ),
    "tensorrt": Flavour(
        "tensorrt",
        "tensorrt",
        "TensorRT (python3-libnvinfer / tensorrt)",
        "on Jetson, TensorRT comes with JetPack (apt install python3-libnvinfer; JetPack 6.2 ships 10.3); on "
        "x86 GPUs, pip install tensorrt from NVIDIA's index (pypi.nvidia.com); PyPI's tensorrt is a stub "
        "that downloads from there",
    ),
}


def flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise BadInputError(
            f"unknown TensorRT flavour '{name}'.", field="tensorrt", fix=f"use one of: {', '.join(FLAVOURS)}."
        )
    return FLAVOURS[name]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def import_tensorrt(name: str, min_version: str | None = None, purpose: str = "") -> ModuleType:
    """The TensorRT module of flavour `name`, with Polygraphy switched to it.

    Raises BadInputError naming the package (and how to install it) when the module is missing, older
    than `min_version`, or when the other flavour is already in use in this process.
    """
    chosen = flavour(name)
    who = f" ({purpose})" if purpose else ""
    if not chosen.available():
        raise BadInputError(
            f"{chosen.name} is not installed: python module '{chosen.module}' not found{who}; it comes "
            f"from {chosen.package}.",
            field="--target",
            fix=f"{chosen.install}.",
        )
    try:
        trt = importlib.import_module(chosen.module)
    except ImportError as err:  # a wheel without its libs, a CUDA mismatch
        raise BadInputError(
            f"{chosen.module} is installed but does not import ({err}){who}.",
            field="--target",
            fix=f"reinstall: {chosen.install}.",
        ) from None
    if min_version and version_tuple(trt.__version__) < version_tuple(min_version):
        raise BadInputError(
            f"{chosen.name} {trt.__version__} is older than the {min_version} the target needs{who}.",
            field="--target",
            fix=f"upgrade: {chosen.install}.",
        )
    _select_polygraphy(chosen)
    return trt


def _select_polygraphy(chosen: Flavour) -> None:
    from polygraphy import config

    want_rtx = chosen.module == "tensorrt_rtx"
    loaded = "polygraphy.backend.trt" in sys.modules
    if loaded and config.USE_TENSORRT_RTX != want_rtx:
        current = "tensorrt_rtx" if config.USE_TENSORRT_RTX else "tensorrt"
        raise BadInputError(
            f"this process already uses {current} through Polygraphy; it cannot switch to {chosen.module}.",
            field="--target",
            fix="build targets of different TensorRT flavours in separate processes.",
        )
    config.USE_TENSORRT_RTX = want_rtx
