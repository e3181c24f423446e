"""Perplexity through the KV cache (validate --ppl) against an independent whole-window torch computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qwen3_compile.backends.torch_reference import TorchRunner
from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError
from qwen3_compile.models.loading import build_reference_model, load_model
from qwen3_compile.tokenizer import load_tokenizer
from qwen3_compile.validate.perplexity import PerplexityRequest, measure_perplexity, read_text, windows_of


def _whole_window_nll(model, rows: np.ndarray) -> np.ndarray:
    """-log p(next token) of every window position but the last: one forward pass, no cache (torch's cross
    entropy)."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows)).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.double().reshape(-1, logits.shape[-1]),
            torch.from_numpy(rows[:, 1:]).reshape(-1),
            reduction="none",
        )
    return nll.double().numpy().reshape(len(rows), -1)


def _damaged(loaded, scale: float, seed: int):
    """The same model with one layer's down projection (or experts') scaled: a different function."""
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    layer = int(np.random.default_rng(seed).integers(loaded.arch.num_layers))
    names = [n for n in state if n.startswith(f"model.layers.{layer}.mlp.") and "down_proj" in n]
    for name in names:
        state[name] *= scale
    if loaded.arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return build_reference_model(loaded.arch, state)


# one model in the default suite, the other in the slow job (each runs whole windows through PyTorch)
@pytest.mark.parametrize("preset", [pytest.param("trained-dense", marks=pytest.mark.slow), "trained-moe"])
def test_cached_windows_match_whole_window_reference(preset):
    """Chunked through the cache (random window and chunk sizes) equals one whole-window pass in torch; a
    damaged model has a higher perplexity, its top-1 and KL measured against the undamaged one."""
    rng = np.random.default_rng()
    window, chunk = int(rng.integers(48, 97)), int(rng.integers(7, 40))
    loaded = load_model(preset)
    tokenizer = load_tokenizer()
    request = PerplexityRequest(window=window, chunk=chunk, max_windows=5)
    same = measure_perplexity(TorchRunner(loaded), TorchRunner(loaded), tokenizer, request, batch=2)

    label, text = read_text(None)
    rows = windows_of(tokenizer(text, add_special_tokens=False)["input_ids"], window, 5, label)
    expected = _whole_window_nll(loaded.model, rows)
    assert same.positions == expected.size == 5 * (window - 1)
    assert same.reference_ppl == pytest.approx(math.exp(expected.mean()), rel=1e-5)
    assert same.ppl_increase == pytest.approx(0.0, abs=1e-9) and same.top1 == 1.0 and same.mean_kl < 1e-9

    damaged = _damaged(loaded, 3.0, int(rng.integers(1 << 30)))
    worse = measure_perplexity(
        TorchRunner(loaded), TorchRunner(type(loaded)(loaded.source, damaged)), tokenizer, request
    )
    damaged_nll = _whole_window_nll(damaged, rows)
    assert worse.artifact_ppl == pytest.approx(math.exp(damaged_nll.mean()), rel=1e-5)
    assert worse.ppl_increase == pytest.approx(math.exp(damaged_nll.mean() - expected.mean()) - 1, rel=1e-4)
    assert worse.ppl_increase > 0 and worse.mean_kl > 1e-4 and worse.top1 < 1.0


def test_trained_models_are_trained():
    """The shipped models predict held-out Python far better than chance (ln 151936 = 11.9 nats) and than a
    random-weight model of the same architecture."""
    tokenizer = load_tokenizer()
    label, text = read_text(None)
    rows = windows_of(tokenizer(text, add_special_tokens=False)["input_ids"], 128, 2, label)
    for preset in ("trained-dense", "trained-moe"):
        loaded = load_model(preset)
        trained = _whole_window_nll(loaded.model, rows).mean()
        assert trained < 6.5, (preset, trained)
        torch.manual_seed(0)
        scrambled = {k: v[torch.randperm(v.shape[0])] for k, v in loaded.model.state_dict().items()}
        if loaded.arch.tie_word_embeddings:
            scrambled.pop("lm_head.weight")
        assert _whole_window_nll(build_reference_model(loaded.arch, scrambled), rows).mean() > trained + 2


def _ppl_args(reference: str, windows: int, prompts) -> list[str]:
    """validate --ppl on a few windows and one prompt, no bisection or long context, --json."""
    return [
        "--reference",
        reference,
        "--ppl",
        "--ppl-windows",
        str(windows),
        "--prompts",
        str(prompts),
        "--decode-steps",
        "4",
        "--no-bisect",
        "--long-context-tokens",
        "0",
        "--json",
    ]


@pytest.fixture
def one_prompt(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"prompt": "def fibonacci(n):"}\n')
    return path


def test_validate_ppl_report_and_gate(artifacts, tmp_path, one_prompt):
    """validate --ppl on an exported trained model: exact (fp32), in report.json and report.md."""
    art = artifacts.export("trained-moe")
    out = tmp_path / "report"
    result = CliRunner().invoke(
        main,
        [
            "validate",
            str(art),
            *_ppl_args("trained-moe", 3, one_prompt),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    ppl = json.loads((out / "report.json").read_text())["perplexity"]
    assert ppl["text"] == "built-in" and ppl["windows"] == 3 and ppl["positions"] == 3 * 255
    assert abs(ppl["ppl_increase"]) < 1e-5 and ppl["top1"] == 1.0
    assert "## Perplexity" in (out / "report.md").read_text()


def test_ppl_text_refusals(tmp_path):
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(BadInputError, match="not UTF-8") as err:
        read_text(binary)
    assert str(err.value.file) == str(binary)
    with pytest.raises(BadInputError, match="fewer than one 256-token window"):
        windows_of([1, 2, 3], 256, None, "short.txt")
    with pytest.raises(BadInputError, match="not a file"):
        read_text(tmp_path)


def test_ppl_gate_fails_a_recipe_that_demands_no_increase(artifacts, tmp_path, one_prompt):
    """A recipe's max_ppl_increase is enforced: int4-rtn (group 32) with the gate at 0 fails on the increase
    it causes, and the same artifact passes with the gate above the measured increase."""
    from qwen3_compile.quantize.recipe import builtin_recipes, load_recipe, with_group_size
    from qwen3_compile.quantize.stage import quantize_artifact

    def quantize_with_gate(gate: float):
        toml = builtin_recipes()["int4-rtn"].read_text()
        assert "max_ppl_increase = 0.10\n" in toml
        toml = toml.replace("max_ppl_increase = 0.10\n", f"max_ppl_increase = {gate}\n")
        (tmp_path / f"gate{gate}.toml").write_text(toml)
        art = tmp_path / f"q{gate}"
        recipe = with_group_size(load_recipe(str(tmp_path / f"gate{gate}.toml")), 32)
        quantize_artifact(artifacts.export("trained-dense"), recipe, art)
        return art

    args = _ppl_args("trained-dense", 2, one_prompt)
    strict = CliRunner().invoke(main, ["validate", str(quantize_with_gate(0.0)), *args])
    assert strict.exit_code == 1, strict.output
    report = json.loads(strict.output)
    increase = report["perplexity"]["ppl_increase"]
    assert increase > 0 and any(f.startswith("perplexity increase") for f in report["failures"])
    loose = CliRunner().invoke(
        main, ["validate", str(quantize_with_gate(round(increase * 2 + 0.01, 4))), *args]
    )
    assert json.loads(loose.output)["gates"]["max_ppl_increase"] > increase
    assert not any(f.startswith("perplexity") for f in json.loads(loose.output)["failures"])
