"""The measurement's JSON results, rewritten after every item, and the guard that records a failing item
with its traceback so the next one runs."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import numpy as np


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


class Results:
    """One JSON file, rewritten after every item."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def put(self, keys: list[str], value) -> None:
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=_plain))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def guarded(results: Results, keys: list[str], fn, *args, **kwargs):
    start = time.perf_counter()
    log("start", "/".join(keys))
    try:
        value = fn(*args, **kwargs)
    except Exception as err:
        log("FAILED", "/".join(keys), repr(err))
        traceback.print_exc()
        value = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(value, dict):
        value = value | {"seconds": round(time.perf_counter() - start, 2)}
    results.put(keys, value)
    log("done", "/".join(keys), f"{time.perf_counter() - start:.1f} s")
    return value
