"""The runner interface and the driver that feeds it: batched prefill with left padding, greedy decode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from qwen3_compile.tokenizer import STOP_IDS


class CausalLMRunner(Protocol):
    name: str

    def empty_cache(self, batch: int) -> Any: ...

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, Any]:
        """logits [B, S, V] float32 and the cache extended by S positions."""
        ...


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # [B, S] int64, left-padded
    attention_mask: np.ndarray  # [B, S] int64
    position_ids: np.ndarray  # [B, S] int64

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.attention_mask.sum(axis=1)]


def left_padded_batch(prompts: list[list[int]], pad_id: int) -> Batch:
    """Prompts of different lengths, left-padded; positions count real tokens only (as HF generate does)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return Batch(ids, mask, positions)


@dataclass(frozen=True)
class Generation:
    prefill_logits: np.ndarray  # [B, S, V]
    step_logits: list[np.ndarray]  # per decode step [B, V]
    tokens: np.ndarray  # [B, steps] generated ids (greedy or forced)


def generate(
    runner: CausalLMRunner,
    batch: Batch,
    steps: int,
    forced: np.ndarray | None = None,
    stop_at_eos: bool = False,
    prefill_chunk: int | None = None,
) -> Generation:
    """Prefill then `steps` decode steps. Greedy unless `forced` [B, steps] gives the tokens to feed
    (teacher forcing: both sides see the same tokens, so one early mismatch does not end a comparison).

    With `prefill_chunk`, the prompt goes in chunks through the KV cache (long prompts: full logits of a
    4K-token prompt are 2.5 GB) and `prefill_logits` keeps only the last chunk's positions."""
    cache = runner.empty_cache(batch.input_ids.shape[0])
    width = batch.input_ids.shape[1]
    chunk = prefill_chunk or width
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        logits, cache = runner.forward(
            batch.input_ids[:, start:end],
            batch.attention_mask[:, :end],
            batch.position_ids[:, start:end],
            cache,
        )
    prefill = logits
    mask, positions = batch.attention_mask, batch.position_ids[:, -1:]
    chosen, step_logits = [], []
    last = logits[:, -1]
    done = np.zeros(batch.input_ids.shape[0], dtype=bool)
    for step in range(steps):
        token = forced[:, step] if forced is not None else last.argmax(axis=-1)
        chosen.append(token)
        done |= np.isin(token, STOP_IDS)
        if stop_at_eos and done.all() or step == steps - 1:
            break
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        positions = positions + 1
        logits, cache = runner.forward(token[:, None].astype(np.int64), mask, positions, cache)
        last = logits[:, -1]
        step_logits.append(last)
    return Generation(prefill, step_logits, np.stack(chosen, axis=1) if chosen else np.zeros((0, 0)))


def empty_kv_cache(batch: int, num_layers: int, kv_heads: int, head_dim: int, dtype) -> list[np.ndarray]:
    """The past for a first call: zero-length key/value per layer (one shared empty array)."""
    empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
    return [empty] * (2 * num_layers)


def graph_feeds(
    input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """The graph contract's inputs: ids, mask, positions and `past_key_values.{i}.key|value`."""
    from qwen3_compile.graph_contract import past_names

    feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    for i in range(len(cache) // 2):
        key, value = past_names(i)
        feeds[key], feeds[value] = cache[2 * i], cache[2 * i + 1]
    return feeds
