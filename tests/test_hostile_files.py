"""Hostile files a user hands us besides checkpoints (recipes, calibration and prompt JSONL, manifests,
graphs): each case builds its bad file, runs the command, and asserts exit 2, no traceback, a message naming
the file or field, no output folder, and every input byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen3_compile.cli import main

RECIPE = (Path(__file__).parents[1] / "qwen3_compile/recipes/quant/int8-wo.toml").read_text()


def _recipe(tmp: Path, text: str) -> Path:
    path = tmp / "recipe.toml"
    path.write_text(text)
    return path


def _bytes(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _fifo(tmp: Path, name: str) -> Path:
    path = tmp / name
    os.mkfifo(path)
    return path


def _manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(change(data) if callable(change) else change)


RECIPES = {  # quantize --recipe FILE
    "gate nan": (RECIPE.replace("max_mean_kl = 0.02", "max_mean_kl = nan"), "max_mean_kl"),
    "gate inf": (RECIPE.replace("max_mean_kl = 0.02", "max_mean_kl = inf"), "max_mean_kl"),
    "top1 above 1": (RECIPE.replace("min_top1 = 0.94", "min_top1 = 2.0"), "min_top1"),
    "include a string": (RECIPE.replace("include = [", "include = '.q_proj'\nx = ["), "include"),
    "unknown key": (RECIPE + "\nsurprise = 1\n", "surprise"),
    "weights dtype": (RECIPE.replace('dtype = "int8"', 'dtype = "int3"'), "dtype"),
    "bad regex": (RECIPE.replace("skip = [", "skip = ['(unclosed', "), "skip"),
    "not toml": ("[weights\n=", "recipe.toml"),
    "empty": ("", "recipe.toml"),
}
RECIPE_BYTES = {"binary": b"\x00\xff\xfe" * 100, "not utf-8": b'name = "\xff"\n'}
CALIBRATION = {  # quantize --calibration FILE
    "binary": b"\x00\xff" * 64,
    "invalid utf-8": b'{"prompt": "\xff\xfe"}\n',
    "a list per line": b"[1, 2, 3]\n",
    "messages not a list": b'{"messages": "hello"}\n',
    "role a number": b'{"messages": [{"role": 3, "content": "hi"}]}\n',
    "nan literal": b'{"prompt": NaN}\n',
    "message not an object": b'{"messages": ["hi"]}\n',
    "answer an object": b'{"messages": [{"role": "user", "content": "hi"}], "answer": {}}\n',
}
PROMPTS = {  # validate --prompts FILE
    "binary": b"\x00\xff" * 64,
    "invalid utf-8": b'"\xff\xfe"\n',
    "a number": b"3\n",
    "empty": b"",
    "object without text": b'{"nothing": 1}\n',
}
MANIFESTS = {  # quantize ARTIFACT whose manifest.json is hostile
    "a list": "[]",
    "not json": "{",
    "missing keys": lambda d: json.dumps({"stage": d["stage"]}),
    "unknown stage": lambda d: json.dumps(d | {"stage": "party"}),
    "nan timing": lambda d: json.dumps(d | {"timings": {"export": float("nan")}}),
    "unknown key": lambda d: json.dumps(d | {"surprise": 1}),
    "output outside": lambda d: json.dumps(
        d | {"outputs": d["outputs"] | {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}}
    ),
    "absolute output": lambda d: json.dumps(
        d | {"outputs": d["outputs"] | {"/etc/passwd": {"sha256": "0" * 64, "bytes": 1}}}
    ),
}
GRAPHS = {"random bytes": os.urandom(4096), "truncated": None, "empty": b""}


def _hashes(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _cases():
    for name, (text, words) in RECIPES.items():
        yield f"recipe: {name}", "recipe", (text, words)
    for name, data in RECIPE_BYTES.items():
        yield f"recipe: {name}", "recipe-bytes", (data, "recipe.toml")
    yield "recipe: fifo", "recipe-fifo", (None, "recipe.toml")
    for name, data in CALIBRATION.items():
        yield f"calibration: {name}", "calib", (data, "calib.jsonl")
    yield "calibration: fifo", "calib-fifo", (None, "calib.jsonl")
    for name, data in PROMPTS.items():
        yield f"prompts: {name}", "prompts", (data, "prompts.jsonl")
    yield "prompts: fifo", "prompts-fifo", (None, "prompts.jsonl")
    for name, change in MANIFESTS.items():
        yield f"manifest: {name}", "manifest", (change, "manifest.json")
    for name, data in GRAPHS.items():
        yield f"graph: {name}", "graph", (data, "model.onnx")
    for command in ("validate", "run"):  # these open the graph in ONNX Runtime, not in onnx
        yield f"graph ({command}): random bytes", f"graph-{command}", (GRAPHS["random bytes"], "model.onnx")


CASES = list(_cases())


@pytest.mark.parametrize("kind, payload", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_is_refused(artifacts, artifact_copy, reseal, tmp_path, kind, payload):
    exported = artifacts.export("tiny-dense")
    out = tmp_path / "out"
    data, words = payload
    files = tmp_path / "inputs"
    files.mkdir()
    if kind == "recipe":
        args = ["quantize", exported, "--recipe", _recipe(files, data), "-o", out]
    elif kind == "recipe-bytes":
        args = ["quantize", exported, "--recipe", _bytes(files, "recipe.toml", data), "-o", out]
    elif kind == "recipe-fifo":
        args = ["quantize", exported, "--recipe", _fifo(files, "recipe.toml"), "-o", out]
    elif kind in ("calib", "calib-fifo"):
        calib = _bytes(files, "calib.jsonl", data) if data is not None else _fifo(files, "calib.jsonl")
        args = [
            "quantize",
            exported,
            "--recipe",
            "int8-sq",
            "--calibration",
            calib,
            "--samples",
            "2",
            "-o",
            out,
        ]
    elif kind in ("prompts", "prompts-fifo"):
        prompts = _bytes(files, "prompts.jsonl", data) if data is not None else _fifo(files, "prompts.jsonl")
        args = ["validate", exported, "--reference", "tiny-dense", "--prompts", prompts, "-o", out]
    elif kind == "manifest":
        exported = artifact_copy(exported)
        _manifest(exported, data)
        args = ["quantize", exported, "--recipe", "int8-wo", "-o", out]
    else:  # a graph that is not an ONNX model, resealed so its manifest agrees with it
        exported = artifact_copy(exported)
        graph = exported / "model.onnx"
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3] if data is None else data)
        reseal(exported)
        args = {
            "graph": ["quantize", exported, "--recipe", "int8-wo", "-o", out],
            "graph-validate": ["validate", exported, "--reference", "tiny-dense", "-o", out],
            "graph-run": ["run", exported, "-p", "hi"],
        }[kind]
    inputs = [Path(exported), files]
    before = _hashes(inputs)
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error = json.loads(result.stdout)
    assert words in error["error"] or words == error["field"], error
    assert not out.exists()
    assert _hashes(inputs) == before
