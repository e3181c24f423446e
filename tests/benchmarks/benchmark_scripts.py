"""Load a script of benchmarks/ as a module for its CPU-testable parts (the scripts are not a package)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@contextlib.contextmanager
def loaded_script(stem: str, *, on_path: bool = False) -> Iterator[object]:
    """benchmarks/<stem>.py as a module, registered in sys.modules while in use (dataclasses look their module
    up there); `on_path`: benchmarks/ on sys.path too, for scripts that import their siblings or their parts
    package (ort_cuda.py: `ort_cuda_parts`). Whatever it imported from benchmarks/ is dropped afterwards."""
    before = set(sys.modules)
    if on_path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(stem, BENCHMARKS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        if on_path:
            sys.path.remove(str(BENCHMARKS))
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if name == stem or BENCHMARKS in Path(origin).parents:
                sys.modules.pop(name, None)
