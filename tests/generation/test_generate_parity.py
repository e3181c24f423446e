"""`run --greedy` on exported tiny presets produces exactly transformers' `generate(do_sample=False)`
tokens for the same rendered prompt, in both reasoning modes; the decode loop reuses the KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3_compile.errors import CheckFailedError
from qwen3_compile.generation.chat import ChatRequest, chat
from qwen3_compile.generation.loop import generate_reply
from qwen3_compile.generation.sampling import GREEDY, Sampler
from qwen3_compile.tokenizer import EMPTY_THINK_BLOCK, STOP_IDS, load_tokenizer, render_chat

WORDS = "the model compiles 模型 编译 推理 résumé naïve 🚀 tokens expert router 专家 数学 12 345 😀".split()
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()  # the packaged real Qwen3 tokenizer, not the artifact's copy


def random_prompt(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 25))))


def transformers_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(STOP_IDS),
        pad_token_id=STOP_IDS[1],
    )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "non-thinking"])
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_greedy_run_equals_transformers_generate(preset, thinking, run_presets, opened_presets, tokenizer):
    loaded = run_presets[preset][0]
    seed = int(np.random.SeedSequence().entropy % 2**32)
    prompt = random_prompt(np.random.default_rng(seed))
    result = chat(
        opened_presets[preset],
        ChatRequest(prompt, thinking, max_new_tokens=NEW_TOKENS, sampling=GREEDY, seed=seed),
    )
    prompt_ids = result.reply.prompt_ids
    assert prompt_ids == render_chat(tokenizer, [{"role": "user", "content": prompt}], thinking)
    assert (prompt_ids[-len(EMPTY_THINK_BLOCK) :] == EMPTY_THINK_BLOCK) is not thinking
    expected = transformers_greedy(loaded.model, prompt_ids, NEW_TOKENS)
    assert result.reply.generated_ids == expected, f"prompt {prompt!r} (seed {seed})"
    assert result.reply.finish_reason == ("stop" if expected[-1] in STOP_IDS else "length")


def test_greedy_stops_at_eos_as_generate_does(run_presets, opened_presets):
    """Random weights rarely emit a stop token, so force <|im_end|> to be the argmax at a random step:
    generation ends there with the stop token included, and the tokens before it are generate's."""
    loaded, artifact = run_presets["tiny-moe"][0], opened_presets["tiny-moe"]
    rng = np.random.default_rng()
    prompt_ids = render_chat(artifact.tokenizer, [{"role": "user", "content": random_prompt(rng)}], False)
    stop_step = int(rng.integers(1, 10))
    forced = ForceAtStep(artifact.runner, stop_step, STOP_IDS[0])
    ours = generate_reply(forced, prompt_ids, NEW_TOKENS, Sampler(GREEDY))
    assert ours.finish_reason == "stop" and ours.generated_ids[-1] == STOP_IDS[0]
    assert len(ours.generated_ids) == stop_step + 1
    head = transformers_greedy(loaded.model, prompt_ids, stop_step)
    assert ours.generated_ids[:-1] == head


class ForceAtStep:
    """Wraps a runner; at generation step `step` the logits make `token` the argmax."""

    def __init__(self, runner, step: int, token: int):
        self.runner, self.step, self.token, self.calls = runner, step, token, 0
        self.name = runner.name

    def empty_cache(self, batch):
        return self.runner.empty_cache(batch)

    def forward(self, input_ids, attention_mask, position_ids, cache):
        logits, cache = self.runner.forward(input_ids, attention_mask, position_ids, cache)
        if self.calls == self.step:
            logits[:, -1, self.token] = logits[:, -1].max() + 1
        self.calls += 1
        return logits, cache


def test_one_prefill_then_one_token_per_step(scripted_artifact, scripted_runner_class):
    runner = scripted_runner_class([11, 12, 13, 14, 15, 16])
    prompt = list(range(100, 107))
    reply = generate_reply(runner, prompt, 5, Sampler(GREEDY))
    assert reply.generated_ids == [11, 12, 13, 14, 15] and reply.finish_reason == "length"
    assert [c["seq"] for c in runner.calls] == [7, 1, 1, 1, 1]  # no forward for the last token
    assert [c["cache"] for c in runner.calls] == [0, 7, 8, 9, 10]  # the runner's cache is handed back
    assert [c["mask"] for c in runner.calls] == [7, 8, 9, 10, 11]
    assert [c["pos"] for c in runner.calls] == [[list(range(7))], [[7]], [[8]], [[9]], [[10]]]


def test_long_prompt_prefills_in_chunks(scripted_runner_class):
    runner = scripted_runner_class([11, 12, 13])
    reply = generate_reply(runner, list(range(10)), 2, Sampler(GREEDY), prefill_chunk=4)
    assert [c["seq"] for c in runner.calls] == [4, 4, 2, 1]
    assert [c["cache"] for c in runner.calls] == [0, 4, 8, 10]
    assert [c["mask"] for c in runner.calls] == [4, 8, 10, 11]
    assert runner.calls[1]["pos"] == [[4, 5, 6, 7]] and runner.calls[3]["pos"] == [[10]]
    assert reply.generated_ids == [13, 13]  # the script counts calls: the prefill took three


def test_stop_token_ends_generation(scripted_runner_class):
    runner = scripted_runner_class([11, STOP_IDS[1], 13])
    reply = generate_reply(runner, [1, 2, 3], 10, Sampler(GREEDY))
    assert reply.generated_ids == [11, STOP_IDS[1]] and reply.finish_reason == "stop"
    assert len(runner.calls) == 2


def test_nan_logits_fail_with_the_step(scripted_runner_class):
    runner = scripted_runner_class([11, 12, 13])
    forward = runner.forward

    def broken(*args):
        logits, cache = forward(*args)
        if len(runner.calls) == 3:
            logits[..., 5] = np.nan
        return logits, cache

    runner.forward = broken
    with pytest.raises(CheckFailedError, match="NaN logits at generation step 2"):
        generate_reply(runner, [1, 2], 10, Sampler(GREEDY))


def test_kv_cache_decode_equals_full_recompute(opened_presets):
    """Each step's logits (the chunked prefill's last, then every cached decode step's) equal a fresh
    single-pass prefill of the whole sequence so far."""
    artifact = opened_presets["tiny-dense"]
    rng = np.random.default_rng()
    prompt = rng.integers(0, 151643, size=int(rng.integers(3, 20))).tolist()
    seen = []

    def choose(logits):
        seen.append(logits.copy())
        return int(np.argmax(logits))

    chunk = int(rng.integers(1, 8))
    reply = generate_reply(artifact.runner, prompt, 6, choose, prefill_chunk=chunk)
    for step in range(len(reply.generated_ids)):
        ids = np.asarray([prompt + reply.generated_ids[:step]], dtype=np.int64)
        full, _ = artifact.runner.forward(
            ids, np.ones_like(ids), np.arange(ids.shape[1])[None], artifact.runner.empty_cache(1)
        )
        np.testing.assert_allclose(seen[step], full[0, -1], atol=1e-4, err_msg=f"chunk {chunk}")
