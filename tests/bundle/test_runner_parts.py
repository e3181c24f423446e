"""The bundled runner's parts against the project's own implementations: chat-template rendering (with and
without jinja2) equals transformers' token ids, streamed text equals the full decode, and the device files
import nothing of qwen3_compile."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from qwen3_compile.tokenizer import load_tokenizer, packaged_tokenizer_dir, render_chat

from .device_files import DEVICE, load_device_module

MESSAGES = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "用两句话介绍长城。"},
    ],
]


@pytest.fixture(scope="module")
def runner():
    return load_device_module(DEVICE / "runner.py", "bundle_runner_parts")


def test_ort_backend_applies_the_recorded_session_config(runner, artifacts, tmp_path, monkeypatch):
    """The bundled runner opens its ORT session as the manifest records (quantize --ort-qdq), like
    qwen3_compile/backends/onnxruntime/settings.py does for the toolchain's own sessions."""
    import shutil

    import onnxruntime as ort

    from qwen3_compile.storage.manifest import read_manifest

    shutil.copytree(artifacts.quantized("tiny-dense", "int8-wo"), tmp_path / "bundle" / "model")
    (tmp_path / "bundle" / "reference").mkdir()
    config = read_manifest(tmp_path / "bundle" / "model").ort_session_config
    assert config == {"session.disable_quant_qdq": "1"}
    manifest = {"ort_optimization": "all", "ort_session_config": config}
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    opened, real = [], ort.InferenceSession
    monkeypatch.setattr(
        ort,
        "InferenceSession",
        lambda path, options, **kw: opened.append(options) or real(path, options, **kw),
    )
    runner.OrtBackend(tmp_path / "bundle")
    assert [o.get_session_config_entry("session.disable_quant_qdq") for o in opened] == ["1"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A folder shaped like a bundle's model/ with the packaged Qwen3 tokenizer."""
    root = tmp_path_factory.mktemp("tok")
    (root / "model").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "model" / name).write_bytes((packaged_tokenizer_dir() / name).read_bytes())
    return root


@pytest.mark.parametrize("thinking", [True, False], ids=["think", "no-think"])
@pytest.mark.parametrize("messages", MESSAGES, ids=["user", "system+user"])
def test_prompt_ids_equal_transformers_with_and_without_jinja2(
    runner, bundle_dir, messages, thinking, monkeypatch
):
    from tokenizers import Tokenizer

    expected = render_chat(load_tokenizer(), messages, thinking)
    tokenizer = Tokenizer.from_file(str(bundle_dir / "model" / "tokenizer.json"))
    text = runner.render_prompt(bundle_dir, messages, thinking)
    assert tokenizer.encode(text, add_special_tokens=False).ids == expected
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)  # no jinja2: the runner's Qwen3 format
    fallback = runner.render_prompt(bundle_dir, messages, thinking)
    assert fallback == text


def test_streamed_pieces_join_to_the_full_text(runner, bundle_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle_dir / "model" / "tokenizer.json"))
    text = "长城 🧱 is long; naïve café — ok"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    decoder = runner.StreamDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens held back mid-character


def test_sampling_stays_within_top_k_and_greedy_is_argmax(runner):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 1000).astype(np.float32)
    top20 = set(np.argsort(-logits)[:20].tolist())
    draws = {runner.choose_token(logits, False, True, rng) for _ in range(200)}
    assert draws <= top20 and len(draws) > 1
    assert runner.choose_token(logits, True, True, rng) == int(np.argmax(logits))


@pytest.mark.parametrize("name", ["runner.py", "trt_backend.py", "build_engine.py", "bundle_files.py"])
def test_device_files_do_not_import_qwen3_compile(name):
    tree = ast.parse((DEVICE / name).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    allowed = {
        "__future__",
        "argparse",
        "json",
        "os",
        "sys",
        "time",
        "pathlib",
        "hashlib",
        "tarfile",
        "ctypes",
        "dataclasses",
        "gzip",
        "shutil",
        "stat",
        "tempfile",
        "zlib",
        "fcntl",  # POSIX only: the device is Linux (JetPack)
        "glob",
    }
    allowed |= {
        "numpy",
        "tokenizers",
        "tensorrt",
        "onnx",
        "onnxruntime",
        "jinja2",
        "bundle_files",
        "trt_backend",
    }
    assert imported <= allowed, imported - allowed


def test_build_plugin_script_builds_in_its_own_folder(tmp_path):
    """The bundle ships build_plugin.sh at its root: the sources and the build folder are beside it."""
    (tmp_path / "build_plugin.sh").write_text((DEVICE / "build_plugin.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cmake").write_text('#!/bin/sh\necho "cmake $*"\n')
    (bin_dir / "cmake").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(
        ["bash", str(tmp_path / "build_plugin.sh"), "87", "/trt/include"],
        cwd=bin_dir,  # not the script's folder: the paths come from the script's location
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    here = tmp_path.resolve()
    assert f"-S {here}/plugins/moe -B {here}/build/plugin -DQMOE_ARCHS=87" in run.stdout
    assert f"--build {here}/build/plugin --target qmoe_trt_plugin" in run.stdout
    assert f"built {here}/build/plugin/libqmoe_trt_plugin.so" in run.stdout


class _StopAfterPlugin(Exception):
    pass


class _Logger:
    INFO = WARNING = 0

    def __init__(self, level):
        pass


def test_build_engine_loads_the_plugin_as_the_runner_does(tmp_path, monkeypatch):
    """build_engine.py loads the MoE plugin through trt_backend.load_plugin: --plugin overrides the
    manifest's path; a missing library names the script that builds it."""
    loaded: list[str] = []

    def builder(logger):
        raise _StopAfterPlugin  # the plugin is loaded; the rest needs a real TensorRT

    trt = types.SimpleNamespace(
        __version__="10.3",
        Logger=_Logger,
        init_libnvinfer_plugins=lambda logger, namespace: True,
        get_plugin_registry=lambda: types.SimpleNamespace(load_library=loaded.append),
        Builder=builder,
    )
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    monkeypatch.delenv("QWEN3_MOE_PLUGIN", raising=False)
    for name in ("trt_backend", "bundle_files"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    build_engine = load_device_module(DEVICE / "build_engine.py", "bundle_build_engine")
    library = "build/plugin/libqmoe_trt_plugin.so"
    manifest = {"moe": {"lowering": "plugin", "plugin_library": library}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    output = tmp_path / "engine" / "model.plan"

    with pytest.raises(
        SystemExit, match=r"libqmoe_trt_plugin.so is missing: run `bash build_plugin.sh` first"
    ):
        build_engine.build(tmp_path, output, None, None, True)
    assert loaded == []
    (tmp_path / library).parent.mkdir(parents=True)
    (tmp_path / library).write_bytes(b"")
    with pytest.raises(_StopAfterPlugin):
        build_engine.build(tmp_path, output, None, None, True)
    assert loaded == [str(tmp_path / library)]
    override = tmp_path / "other.so"
    with pytest.raises(SystemExit, match="other.so is missing"):
        build_engine.build(tmp_path, output, override, None, True)
    override.write_bytes(b"")
    with pytest.raises(_StopAfterPlugin):
        build_engine.build(tmp_path, output, override, None, True)
    assert loaded == [str(tmp_path / library), str(override)]
