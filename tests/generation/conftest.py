"""Artifacts for `run`: tiny presets exported for ONNX Runtime, and a scripted artifact whose runner
emits a fixed token sequence (to test stopping, streaming and the reasoning split end to end)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from qwen3_compile.backends import registry
from qwen3_compile.generation import artifact as artifact_module
from qwen3_compile.storage import manifests
from qwen3_compile.storage.manifests import FileRecord

VOCAB = 151936
SCRIPTED_STAGE = "scripted-test"


@pytest.fixture(scope="session")
def run_presets(artifacts):
    """preset -> (LoadedModel reference, its `lower --for ort` folder); shared, read-only."""
    return {
        name: (artifacts.loaded(name), artifacts.lowered(name).directory)
        for name in ("tiny-dense", "tiny-moe")
    }


@pytest.fixture(scope="session")
def opened_presets(run_presets):
    """preset -> ChatArtifact (tokenizer and ONNX Runtime session loaded once)."""
    return {name: artifact_module.open_chat_artifact(folder) for name, (_, folder) in run_presets.items()}


class ScriptedRunner:
    """A CausalLMRunner whose logits make `script[i]` the clear favourite at generation step i.

    The cache is the number of positions seen, so tests can check that it is threaded through.
    """

    name = "scripted"

    def __init__(self, script: list[int]):
        self.script = script
        self.calls: list[dict] = []

    def empty_cache(self, batch: int) -> int:
        return 0

    def forward(self, input_ids, attention_mask, position_ids, cache):
        batch, seq = input_ids.shape
        self.calls.append(
            {"seq": seq, "cache": cache, "mask": attention_mask.shape[1], "pos": position_ids.tolist()}
        )
        step = len(self.calls) - 1
        logits = np.zeros((batch, seq, VOCAB), dtype=np.float32)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 100.0
        return logits, cache + seq


@dataclass(frozen=True, kw_only=True)
class ScriptedOptions:
    max_positions: int | None = None


@dataclass(frozen=True, kw_only=True)
class ScriptedManifest:
    """The manifest of a scripted artifact: a stage of its own and, optionally, a context limit."""

    stage: str
    options: ScriptedOptions = ScriptedOptions()
    outputs: dict[str, FileRecord] = field(default_factory=dict)


@pytest.fixture
def scripted_artifact(tmp_path, monkeypatch):
    """factory(script, max_positions=None) -> a folder whose manifest stage runs a ScriptedRunner."""
    runners: list[ScriptedRunner] = []

    def load(folder: Path, manifest: dict) -> ScriptedRunner:
        runners.append(ScriptedRunner(json.loads((folder / "script.json").read_text())))
        return runners[-1]

    monkeypatch.setitem(registry.BACKENDS, SCRIPTED_STAGE, load)
    monkeypatch.setitem(registry.STAGE_BACKENDS, SCRIPTED_STAGE, SCRIPTED_STAGE)
    monkeypatch.setitem(manifests.ARTIFACT_KINDS, SCRIPTED_STAGE, ScriptedManifest)

    def make(script: list[int], max_positions: int | None = None) -> Path:
        folder = tmp_path / f"scripted-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "script.json").write_text(json.dumps(script))
        options = {"max_positions": max_positions} if max_positions else {}
        (folder / "manifest.json").write_text(json.dumps({"stage": SCRIPTED_STAGE, "options": options}))
        return folder

    make.runners = runners
    return make


@pytest.fixture
def scripted_runner_class():
    return ScriptedRunner
