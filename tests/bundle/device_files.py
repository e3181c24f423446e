"""The files that ship in bundles (qwen3_compile/bundle/device/) import nothing of qwen3_compile: tests load
each as a plain module from its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DEVICE = Path(__file__).parents[2] / "qwen3_compile" / "bundle" / "device"


def load_device_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
