"""Perplexity of an artifact and of its reference on the same text, through the KV cache.

The text is cut into fixed windows of `window` tokens. Each window starts from an empty cache and goes in
`chunk`-token pieces, each piece attending to the cached keys and values of the ones before it, so a
quantized KV cache counts as it does in deployment. Every position but a window's first predicts its next
token; both sides see the same tokens. Reported: both perplexities, the relative increase, token-level
top-1 agreement and mean KL(reference || artifact), all over the same positions.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from qwen3_compile.errors import BadInputError
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.validate.metrics import compare_logits

BUILTIN_TEXT = "heldout_python.txt"
DEFAULT_WINDOW = 256
DEFAULT_CHUNK = 64
MAX_TEXT_BYTES = 64 * 1024 * 1024  # a text file, not a corpus: refuse anything larger before reading it


@dataclass(frozen=True)
class PerplexityRequest:
    """What to score: `text` (None: the built-in held-out text) in `window`-token windows fed `chunk`
    tokens at a time, at most `max_windows` of them (None: the whole text)."""

    text: Path | None = None
    window: int = DEFAULT_WINDOW
    chunk: int = DEFAULT_CHUNK
    max_windows: int | None = None


@dataclass(frozen=True)
class PerplexityResult:
    text: str  # the file scored, or "built-in"
    text_sha256: str
    window: int
    chunk: int
    windows: int
    positions: int  # scored positions (window - 1 per window)
    reference_ppl: float
    artifact_ppl: float
    ppl_increase: float  # artifact_ppl / reference_ppl - 1
    top1: float  # positions where both sides' most likely next token is the same
    mean_kl: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(label, text): the user's UTF-8 file, or the built-in held-out text when `path` is None."""
    if path is None:
        return "built-in", resources.files("qwen3_compile.validate").joinpath(BUILTIN_TEXT).read_text()
    path = Path(path)
    if not path.is_file():
        raise BadInputError(
            "the perplexity text is not a file.", file=path, field="--ppl", fix="pass a text file."
        )
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise BadInputError(
            f"the perplexity text is {path.stat().st_size / 2**20:.0f} MiB; the limit is "
            f"{MAX_TEXT_BYTES // 2**20} MiB.",
            file=path,
            field="--ppl",
            fix="pass a smaller excerpt (a few hundred KB give a stable estimate).",
        )
    try:
        return str(path), path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(
            f"the perplexity text is not UTF-8 (byte {err.start}).",
            file=path,
            field="--ppl",
            fix="convert the file to UTF-8 text.",
        ) from None


def windows_of(ids: list[int], window: int, max_windows: int | None, source: str) -> np.ndarray:
    """[N, window] int64: the text's consecutive whole windows (a partial tail is dropped)."""
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise BadInputError(
            f"the text has {len(ids)} tokens, fewer than one {window}-token window.",
            file=source,
            field="--ppl",
            fix=f"pass a longer text, or a smaller --ppl-window (it needs at least {window} tokens).",
        )
    return np.asarray(ids[: count * window], dtype=np.int64).reshape(count, window)


def _window_logits(runner, rows: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Logits of every position of `rows` [B, W], fed chunk by chunk through the runner's KV cache."""
    batch, width = rows.shape
    cache = runner.empty_cache(batch)
    mask_full = np.ones((batch, width), dtype=np.int64)
    positions = np.tile(np.arange(width, dtype=np.int64), (batch, 1))
    pieces = []
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        logits, cache = runner.forward(
            np.ascontiguousarray(rows[:, start:end]),
            mask_full[:, :end],
            np.ascontiguousarray(positions[:, start:end]),
            cache,
        )
        pieces.append(logits)
    return pieces


def measure_perplexity(
    reference,
    candidate,
    tokenizer,
    request: PerplexityRequest = PerplexityRequest(),
    *,
    batch: int = 4,
    progress: Progress = NO_PROGRESS,
) -> PerplexityResult:
    """Reference and artifact perplexity on the request's text (see the module docstring). `reference` and
    `candidate` are runners (backends.base.CausalLMRunner), fed `batch` windows at a time."""
    window, chunk = request.window, request.chunk
    label, text = read_text(request.text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = windows_of(ids, window, request.max_windows, label)
    nll_ref, nll_art, top1, kl = [], [], [], []
    with progress.stage("perplexity", total=len(rows), unit="windows") as advance:
        for start in range(0, len(rows), batch):
            block = rows[start : start + batch]
            ref_pieces = _window_logits(reference, block, chunk)
            art_pieces = _window_logits(candidate, block, chunk)
            for b in range(len(block)):
                for k, (ref, art) in enumerate(zip(ref_pieces, art_pieces, strict=True)):
                    start_pos = k * chunk
                    # position p predicts token p + 1: the window's last position has no target
                    end = min(ref.shape[1], window - 1 - start_pos)
                    m = compare_logits(
                        ref[b, :end], art[b, :end], block[b, start_pos + 1 : start_pos + 1 + end]
                    )
                    nll_ref += m.nll_reference
                    nll_art += m.nll_artifact
                    top1 += m.top1
                    kl += m.kl
            advance(len(block))
    ref_mean, art_mean = float(np.mean(nll_ref)), float(np.mean(nll_art))
    return PerplexityResult(
        text=label,
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        window=window,
        chunk=chunk,
        windows=len(rows),
        positions=len(top1),
        reference_ppl=float(np.exp(ref_mean)),
        artifact_ppl=float(np.exp(art_mean)),
        ppl_increase=float(np.expm1(art_mean - ref_mean)),
        top1=float(np.mean(top1)),
        mean_kl=float(np.mean(kl)),
    )
