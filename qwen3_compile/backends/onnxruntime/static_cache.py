"""A static KV cache for graphs lowered with `--attention gqa`: one buffer per layer and key/value, written
in place by `com.microsoft::GroupQueryAttention`, so every decode step has the same input shapes and
addresses (what CUDA graph capture needs).

The cache holds, per layer, ONE OrtValue [B, kv_heads, L, head_dim] bound both as `past_key_values.i.*` and as
`present.i.*`; GQA sees the same pointer and writes the new rows in place (its shared-buffer mode). The first
call (empty cache) feeds the caller's attention mask [B, S]: GQA's first-prompt path, any batch. Every
later call feeds a fixed [B, L] mask, the caller's [B, T] mask followed by zeros: GQA reads only its row
sums (seqlens_k) and its width (total_sequence_length = L), so a decode step's inputs are [B, 1] ids and
positions and the [B, L] mask, step after step. position_ids pass through (GQA does not read them).

Checked on ORT CPU 1.31.1 and 1.32.0 (tests/lower/test_ort_gqa.py and by hand): CPU GQA accepts the shared
buffer (same OrtValue as input and output) and a mask wider than the valid length; logits and the
buffer's valid rows equal the canonical graph's (fp32: 2e-5 on logits of 60), rows past the valid length
are left as they were. A multi-token call after a non-empty past (a prompt continued) runs for batch 1
only: ORT refuses batch > 1 ("batch_size must be 1 when sequence_length > 1 and past context is given").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen3_compile.errors import BadInputError
from qwen3_compile.graph_contract import GQA_MAX_POSITIONS, LOGITS_NAN, NEXT_TOKEN


@dataclass(frozen=True)
class StaticCache:
    """The per-layer buffers and how many positions they hold. A step writes the buffers in place: only
    the cache a step returns is valid afterwards, and the runner hands the same buffers to every
    `empty_cache` of one batch size (one live sequence batch per runner and batch size)."""

    buffers: list[Any]  # OrtValues [B, kv_heads, L, head_dim], key and value per layer
    batch: int
    capacity: int  # L
    length: int = 0  # positions written so far (the mask width of the last step)


def gqa_cache_limit(session) -> int | None:
    """The positions a GQA graph's rotary tables cover (the export's max_positions, which the lowering
    records in the model's metadata); None for a graph without GroupQueryAttention."""
    value = session.get_modelmeta().custom_metadata_map.get(GQA_MAX_POSITIONS)
    return int(value) if value else None


def check_gqa_batch(attention_mask: np.ndarray, new_tokens: int, past: int) -> None:
    """Refuse what ORT's GroupQueryAttention computes differently from the canonical graph: it takes each
    row's tokens as contiguous from cache row 0 (seqlens_k = row sum - 1), so a left-padded row (mask
    starting with 0) would attend its padding; and it runs a multi-token step after a non-empty past for
    batch 1 only. Unpadded and right-padded batches are exact."""
    if (attention_mask[:, 0] == 0).any():
        raise BadInputError(
            "this graph was lowered with --attention gqa, whose GroupQueryAttention takes each row's tokens "
            "as contiguous from position 0; a row of this batch starts with padding (left padding).",
            field="attention_mask",
            fix="pad on the right (or run one sequence at a time), or use a graph lowered with "
            "--attention standard.",
        )
    if past and new_tokens > 1 and attention_mask.shape[0] > 1:
        raise BadInputError(
            "GroupQueryAttention continues a prompt (several new tokens after a non-empty past) for batch 1 "
            f"only; this step has batch {attention_mask.shape[0]}.",
            field="input_ids",
            fix="prefill the whole prompt in one call, or continue one sequence at a time.",
        )


def static_mask(attention_mask: np.ndarray, cache: StaticCache) -> np.ndarray:
    """The mask GQA gets: the caller's on the first call, else the caller's [B, T] padded to [B, L]."""
    batch, width = attention_mask.shape
    if batch != cache.batch:
        raise BadInputError(
            f"the static cache was made for batch {cache.batch}, this step has batch {batch}.",
            field="attention_mask",
            fix="make the cache with empty_cache(batch) for the batch you run.",
        )
    if width > cache.capacity:
        raise BadInputError(
            f"the static KV cache holds {cache.capacity} positions; this step needs {width}.",
            field="static_cache_length",
            fix="open the runner with a larger static_cache_length (up to the export's --max-positions).",
        )
    if cache.length == 0:
        return np.ascontiguousarray(attention_mask, dtype=np.int64)
    mask = np.zeros((batch, cache.capacity), dtype=np.int64)
    mask[:, :width] = attention_mask
    return mask


class CapturedDecode:
    """Decode steps replayed from a CUDA graph (ORT's CUDA provider option `enable_cuda_graph=1`). Measured
    on the GPU only: nothing here runs on the CPU machine.

    A captured graph replays fixed device addresses, so every input and output of a decode step lives in a
    device OrtValue made once ([B, 1] ids and positions, the [B, L] mask, [B, 1, V] logits, and a
    deployment graph's greedy token and NaN flag) and is updated in place; the KV buffers are the static
    cache's. Steps run with the run config `gpu_graph_id=1`: ORT runs the first ones normally, captures
    one, then replays it. The prefill runs with `gpu_graph_id=-1` (not captured: its shapes differ per
    prompt). The runner reuses one batch size's buffers for every `empty_cache`, so the captured graph
    serves every later generation of that batch size; another batch size needs another runner (one graph
    id per runner)."""

    GRAPH_ID = "1"

    def __init__(
        self, session, cache: StaticCache, inputs: tuple[str, ...], past: list[str], present: list[str]
    ):
        import onnxruntime as ort

        batch, vocab = cache.batch, session.get_outputs()[0].shape[2]
        self.session, self.cache = session, cache

        def device(shape, dtype):
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), "cuda", 0)

        self.ids, self.positions = device((batch, 1), np.int64), device((batch, 1), np.int64)
        self.mask = device((batch, cache.capacity), np.int64)
        # every output at a fixed address; a deployment graph's greedy outputs too (graph_contract)
        self.outputs = {"logits": device((batch, 1, vocab), np.float32)}
        names = {o.name for o in session.get_outputs()}
        if {NEXT_TOKEN, LOGITS_NAN} <= names:
            self.outputs |= {NEXT_TOKEN: device((batch, 1), np.int64), LOGITS_NAN: device((batch, 1), bool)}
        self.binding = session.io_binding()
        for name, value in zip(inputs, (self.ids, self.mask, self.positions), strict=True):
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        for name_in, name_out, value in zip(past, present, cache.buffers, strict=True):
            self.binding.bind_ortvalue_input(name_in, value)
            self.binding.bind_ortvalue_output(name_out, value)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", self.GRAPH_ID)

    def step(
        self, input_ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, wanted: tuple[str, ...]
    ) -> list[np.ndarray]:
        """One replayed step; the `wanted` outputs copied to the host (the others stay on the device)."""
        self.ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.mask.update_inplace(mask)
        self.positions.update_inplace(np.ascontiguousarray(position_ids, dtype=np.int64))
        self.session.run_with_iobinding(self.binding, self.run_options)
        return [self.outputs[name].numpy() for name in wanted]


def not_captured():
    """Run options of a call that must not be captured (the prefill) in a session with CUDA graphs on."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", "-1")
    return options
