"""The software and processor a result was computed with: parity and validation numbers of an fp32 graph
move with the runtime's kernels, so every report names them (the package versions are the ones every
manifest records, storage.manifest.tool_versions)."""

from __future__ import annotations

import platform
from functools import cache

from qwen3_compile.storage.manifest import tool_versions


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
    versions = tool_versions()
    return {
        "python": versions.pop("python"),
        "machine": platform.machine(),
        "processor": _processor(),
        "packages": versions,
    }
