"""The decode loop over any `CausalLMRunner`: one prefill of the prompt, then one token per step.

The runner keeps the KV cache (ONNX Runtime's present -> past tensors today, a TensorRT engine's
cache later); this loop only hands it back, so no backend code lives here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qwen3_compile.backends.base import CausalLMRunner
from qwen3_compile.errors import CheckFailedError
from qwen3_compile.tokenizer import STOP_IDS

# Full-logit graphs return [S, 151936] fp32 per prefill: 512 positions are 311 MB
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Reply:
    prompt_ids: list[int]
    generated_ids: list[int]  # ends with the stop token when one ended generation
    finish_reason: str  # "stop" (a stop token) or "length" (max new tokens or the context limit)
    prefill_s: float  # the prompt's forward pass and the first token's choice
    decode_s: float  # every later step: forward pass of one token and the next choice

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens made by the one-token steps per second (prefill excluded)."""
        steps = len(self.generated_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None


def _refuse_nan(has_nan: bool, step: int, runner: CausalLMRunner) -> None:
    """NaN logits mean a broken artifact, not a token to pick."""
    if has_nan:
        raise CheckFailedError(
            f"{runner.name} returned NaN logits at generation step {step}.",
            field="logits",
            fix="check the artifact with `qwen3-compile validate` (it names the first diverging layer), "
            "or re-export it in fp32.",
        )


def _next_token(runner, choose, ids, mask, positions, cache, step: int) -> tuple[int, object]:
    """(the token after this call, the cache). A greedy `choose` on a runner that picks the greedy token
    itself (an ONNX Runtime deployment graph, `lower --logits last`) never brings the logits to the host."""
    if getattr(choose, "greedy", False) and getattr(runner, "greedy", False):
        tokens, nan, cache = runner.forward_greedy(ids, mask, positions, cache)
        _refuse_nan(bool(nan[0]), step, runner)
        return int(tokens[0]), cache
    logits, cache = runner.forward(ids, mask, positions, cache)
    last = logits[0, -1]
    _refuse_nan(bool(np.isnan(last).any()), step, runner)
    return choose(last), cache


def generate_reply(
    runner: CausalLMRunner,
    prompt_ids: list[int],
    max_new_tokens: int,
    choose: Callable[[np.ndarray], int],
    on_token: Callable[[int], None] | None = None,
    stop_ids: tuple[int, ...] = STOP_IDS,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Reply:
    """Generate up to `max_new_tokens` after `prompt_ids` (batch 1), stopping after a stop token.

    `choose` maps the last position's logits [V] to the next token (a `Sampler`; a greedy one lets a runner
    with `forward_greedy` pick the token on its device); `on_token` sees each
    token as soon as it is chosen (streaming). Time spent in `on_token` is not counted. The prompt is
    prefilled `prefill_chunk` tokens at a time through the cache, which bounds the memory of graphs
    that return logits for every position.
    """
    ids = np.asarray([prompt_ids], dtype=np.int64)  # [1, S]
    length = ids.shape[1]
    start = time.perf_counter()
    cache = runner.empty_cache(1)
    starts = range(0, length, prefill_chunk)
    for begin in starts:
        end = min(begin + prefill_chunk, length)
        chunk = (
            ids[:, begin:end],
            np.ones((1, end), dtype=np.int64),
            np.arange(begin, end, dtype=np.int64)[None],
        )
        if begin != starts[-1]:  # an earlier chunk only fills the cache: nothing is chosen from it
            _, cache = runner.forward(*chunk, cache)
            continue
        token, cache = _next_token(runner, choose, *chunk, cache, 0)
    prefill_s = time.perf_counter() - start
    generated, decode_s = [token], 0.0
    while True:
        if on_token is not None:
            on_token(token)
        if token in stop_ids:
            finish = "stop"
            break
        if len(generated) >= max_new_tokens:
            finish = "length"
            break
        start = time.perf_counter()
        position = length + len(generated) - 1  # the position of `token`, fed now
        token, cache = _next_token(
            runner,
            choose,
            np.asarray([[token]], dtype=np.int64),
            np.ones((1, position + 1), dtype=np.int64),
            np.asarray([[position]], dtype=np.int64),
            cache,
            len(generated),
        )
        decode_s += time.perf_counter() - start
        generated.append(token)
    return Reply(list(prompt_ids), generated, finish, prefill_s, decode_s)
