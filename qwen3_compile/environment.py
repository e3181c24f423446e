"""The software and processor a result was computed with: parity and validation numbers of an fp32 graph
move with the runtime's kernels, so every report names them."""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata

PACKAGES = ("qwen3-compile", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy")


def _processor() -> str:
    """The CPU's model name on Linux (platform.processor() is often empty there), else what Python knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@cache
def environment() -> dict[str, object]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _processor(),
        "packages": versions,
    }
