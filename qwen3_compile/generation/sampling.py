"""Next-token choice: greedy argmax, or sampling with temperature, top-k and top-p (nucleus) filtering.

The filters run in the order transformers' `generate` applies its logits warpers (temperature, then
top-k, then top-p; see `GenerationMixin._get_logits_processor`), so a seeded run here samples from the
same distribution as `generate(do_sample=True, ...)`. The order matters for top-p: the nucleus is taken
over the temperature-scaled distribution. Randomness comes from a seedable numpy Generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from qwen3_compile.errors import BadInputError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. `top_k=0` and `top_p=1.0` disable those filters."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise BadInputError(
                f"temperature {self.temperature} is not positive.",
                field="--temperature",
                fix="use a value > 0, or --greedy for argmax decoding.",
            )
        if not 0 < self.top_p <= 1:
            raise BadInputError(
                f"top-p {self.top_p} is outside (0, 1].", field="--top-p", fix="use 0 < top-p <= 1."
            )
        if self.top_k < 0:
            raise BadInputError(
                f"top-k {self.top_k} is negative.", field="--top-k", fix="use top-k >= 0 (0 disables it)."
            )

    def to_dict(self) -> dict:
        return {"greedy": True} if self.greedy else asdict(self)


# Qwen3 model card, "Best Practices": thinking and non-thinking mode sampling parameters
THINKING_SAMPLING = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20)
NON_THINKING_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.8, top_k=20)
GREEDY = SamplingConfig(greedy=True)


def default_sampling(thinking: bool) -> SamplingConfig:
    return THINKING_SAMPLING if thinking else NON_THINKING_SAMPLING


def filtered_logits(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """logits [V] -> float64 [V]: temperature-scaled, -inf outside the top-k set and the nucleus."""
    scores = np.asarray(logits, dtype=np.float64) / config.temperature
    if 0 < config.top_k < scores.shape[-1]:
        kth = np.partition(scores, -config.top_k)[-config.top_k]
        scores = np.where(scores < kth, -np.inf, scores)  # ties with the k-th score stay, as in transformers
    if config.top_p < 1.0:
        # Only finite candidates matter (filtered tokens have probability 0), so sort just those
        candidates = np.flatnonzero(np.isfinite(scores))
        order = candidates[np.argsort(scores[candidates], kind="stable")]  # ascending
        probs = np.exp(scores[order] - scores[order[-1]])
        cumulative = np.cumsum(probs / probs.sum())
        # Drop the low tail whose total mass is <= 1 - top_p; the most likely token always stays
        drop = cumulative <= 1.0 - config.top_p
        drop[-1] = False
        scores = scores.copy()
        scores[order[drop]] = -np.inf
    return scores


def sampling_probs(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The distribution a token is drawn from: float64 [V], zero outside the filters."""
    scores = filtered_logits(logits, config)
    probs = np.exp(scores - scores.max())
    return probs / probs.sum()


class Sampler:
    """Picks the next token from one row of logits [V]; seeded for reproducible runs."""

    def __init__(self, config: SamplingConfig, seed: int | None = None):
        self.config = config
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        """Greedy picks the largest logit: a runner may do that on its device (`forward_greedy`)."""
        return self.config.greedy

    def __call__(self, logits: np.ndarray) -> int:
        if self.config.greedy:
            return int(np.argmax(logits))
        probs = sampling_probs(logits, self.config)
        kept = np.flatnonzero(probs)
        cumulative = np.cumsum(probs[kept])
        # Inverse CDF on the kept tokens: one uniform draw per step
        pick = np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")
        return int(kept[min(pick, kept.size - 1)])
