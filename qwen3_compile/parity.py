"""Parity of a compiled artifact against the PyTorch reference on chat prompts in both reasoning modes.

Prefill: max |logit difference| and top-1 agreement over every real (non-padding) position of a
left-padded batch. Decode: free-running greedy generation on both sides must give the same tokens, and
the candidate teacher-forced on the reference's tokens gives per-step logit errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from qwen3_compile.backends.base import CausalLMRunner, Generation, generate, left_padded_batch
from qwen3_compile.tokenizer import ENDOFTEXT_ID, render_chat

PARITY_PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "用一句话介绍长城。"},
    ],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": 'Return {"sum": 17 + 25} as JSON, computed.'}],
]


@dataclass(frozen=True)
class ParityGates:
    max_abs: float | None = 1e-4  # None: reported, not gated
    min_top1: float = 1.0
    greedy_identical: bool = True

    @classmethod
    def for_dtype(cls, dtype: str) -> ParityGates:
        return cls() if dtype == "fp32" else cls(max_abs=None, min_top1=0.995, greedy_identical=False)


@dataclass(frozen=True)
class ParityReport:
    reference: str
    candidate: str
    sequences: int
    modes: list[str]
    prefill_positions: int
    prefill_max_abs: float
    prefill_mean_abs: float
    prefill_top1: float
    decode_steps: int
    decode_max_abs: float
    greedy_identical: int  # sequences whose greedy tokens match exactly
    greedy_match_lengths: list[int]
    gates: ParityGates
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def parity_prompts(tokenizer) -> tuple[list[list[int]], list[str]]:
    """Every prompt rendered with the real chat template in thinking and non-thinking mode."""
    ids, modes = [], []
    for messages in PARITY_PROMPTS:
        for thinking in (True, False):
            ids.append(render_chat(tokenizer, messages, thinking=thinking))
            modes.append("thinking" if thinking else "non-thinking")
    return ids, modes


def _match_length(a: np.ndarray, b: np.ndarray) -> int:
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if diff.size else len(a)


def reference_run(reference: CausalLMRunner, prompts: list[list[int]], decode_steps: int = 32) -> Generation:
    """The reference side of a parity check, computed once (the reference model can then be freed)."""
    return generate(reference, left_padded_batch(prompts, ENDOFTEXT_ID), decode_steps)


def check_parity(
    reference: CausalLMRunner | Generation,
    candidate: CausalLMRunner,
    prompts: list[list[int]],
    modes: list[str],
    decode_steps: int = 32,
    gates: ParityGates | None = None,
) -> ParityReport:
    """`reference` is a runner, or its `reference_run` on the same prompts and decode steps."""
    gates = gates or ParityGates()
    batch = left_padded_batch(prompts, ENDOFTEXT_ID)
    if isinstance(reference, Generation):
        ref, reference_name = reference, "pytorch"
    else:
        ref, reference_name = generate(reference, batch, decode_steps), reference.name
    cand = generate(candidate, batch, decode_steps)
    forced = generate(candidate, batch, decode_steps, forced=ref.tokens)

    real = batch.attention_mask.astype(bool)
    ref_prefill, cand_prefill = ref.prefill_logits[real], cand.prefill_logits[real]
    prefill_error = np.abs(ref_prefill - cand_prefill)
    prefill_max_abs, prefill_mean_abs = float(prefill_error.max()), float(prefill_error.mean())
    prefill_top1 = float((ref_prefill.argmax(-1) == cand_prefill.argmax(-1)).mean())
    decode_max_abs = max(
        (float(np.abs(a - b).max()) for a, b in zip(ref.step_logits, forced.step_logits, strict=True)),
        default=0.0,
    )
    lengths = [_match_length(r, c) for r, c in zip(ref.tokens, cand.tokens, strict=True)]
    identical = sum(n == ref.tokens.shape[1] for n in lengths)

    failures = []
    if gates.max_abs is not None and max(prefill_max_abs, decode_max_abs) > gates.max_abs:
        failures.append(f"max |logit error| {max(prefill_max_abs, decode_max_abs):.3g} > {gates.max_abs:g}")
    if prefill_top1 < gates.min_top1:
        failures.append(f"prefill top-1 agreement {prefill_top1:.4f} < {gates.min_top1}")
    if gates.greedy_identical and identical < len(prompts):
        failures.append(f"greedy tokens differ in {len(prompts) - identical} of {len(prompts)} sequences")
    return ParityReport(
        reference=reference_name,
        candidate=candidate.name,
        sequences=len(prompts),
        modes=sorted(set(modes)),
        prefill_positions=int(real.sum()),
        prefill_max_abs=prefill_max_abs,
        prefill_mean_abs=prefill_mean_abs,
        prefill_top1=prefill_top1,
        decode_steps=decode_steps,
        decode_max_abs=decode_max_abs,
        greedy_identical=identical,
        greedy_match_lengths=lengths,
        gates=gates,
        failures=failures,
    )
