"""CUDA kernels of the MoE plugin (sources in `plugins/moe/`), their build and a ctypes binding.

`build` compiles the sources with nvcc (no GPU needed); `moe` holds the binding (`moe_forward`,
`moe_route`) and the float64 torch reference (`moe_reference`). Importing this package imports
neither torch nor CUDA: the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "build_library": "build",
    "find_nvcc": "build",
    "TARGET_ARCHS": "build",
    "KernelBuildError": "build",
    "moe_forward": "moe",
    "moe_route": "moe",
    "moe_reference": "moe",
    "route_reference": "moe",
    "quantize_int8": "moe",
    "QmoeError": "moe",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
