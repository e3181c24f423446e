"""Per-position comparison of two logit tensors: KL(reference || artifact), top-1 agreement, cosine,
max |difference|. Computed in float64 so tiny divergences are not lost to rounding."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class PositionMetrics:
    """One value per position ([N] arrays as lists)."""

    kl: list[float]
    top1: list[bool]
    cosine: list[float]
    max_abs: list[float]


def compare_logits(reference: np.ndarray, artifact: np.ndarray, rows: int = 128) -> PositionMetrics:
    """reference, artifact: [N, V] logits of the same N positions (float64 math, `rows` at a time)."""
    if len(reference) > rows:
        parts = [
            compare_logits(reference[i : i + rows], artifact[i : i + rows])
            for i in range(0, len(reference), rows)
        ]
        return PositionMetrics(
            *([v for p in parts for v in getattr(p, f)] for f in ("kl", "top1", "cosine", "max_abs"))
        )
    ref_logp, art_logp = log_softmax(reference), log_softmax(artifact)
    kl = (np.exp(ref_logp) * (ref_logp - art_logp)).sum(axis=-1)
    ref64, art64 = reference.astype(np.float64), artifact.astype(np.float64)
    cosine = (ref64 * art64).sum(-1) / (
        np.linalg.norm(ref64, axis=-1) * np.linalg.norm(art64, axis=-1) + 1e-300
    )
    return PositionMetrics(
        kl=np.maximum(kl, 0.0).tolist(),
        top1=(reference.argmax(-1) == artifact.argmax(-1)).tolist(),
        cosine=cosine.tolist(),
        max_abs=np.abs(ref64 - art64).max(-1).tolist(),
    )


@dataclass(frozen=True)
class Summary:
    positions: int
    mean_kl: float
    max_kl: float
    top1: float
    min_cosine: float
    max_abs: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarise(metrics: list[PositionMetrics]) -> Summary:
    kl = [v for m in metrics for v in m.kl]
    if not kl:
        return Summary(0, 0.0, 0.0, 1.0, 1.0, 0.0)
    return Summary(
        positions=len(kl),
        mean_kl=float(np.mean(kl)),
        max_kl=float(np.max(kl)),
        top1=float(np.mean([v for m in metrics for v in m.top1])),
        min_cosine=float(np.min([v for m in metrics for v in m.cosine])),
        max_abs=float(np.max([v for m in metrics for v in m.max_abs])),
    )
