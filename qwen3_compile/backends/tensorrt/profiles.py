"""Optimisation profiles for the one-graph prefill/decode contract.

TensorRT checks that each profile's min, opt and max shapes are consistent on their own: the attention
mask spans past + new tokens, so `attention_mask` = `past_sequence_length` + `sequence_length` in each of
the three. Three profiles cover generation up to `max_seq` tokens:

- prefill: 1..max_seq new tokens, no past (the prompt in one call);
- decode: one new token after 0..max_seq-1 cached ones;
- chunked: 1..chunk new tokens after 0..max_seq-1 cached ones (long prompts in chunks, as `validate` and
  `run` feed them). Its mask range reaches max_seq + chunk - 1 because a profile cannot say "past + new
  <= max_seq"; the runner holds calls to max_seq.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qwen3_compile.errors import BadInputError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the parser sees it: -1 for dynamic axes."""

    name: str
    shape: Shape


@dataclass(frozen=True)
class ShapeProfile:
    name: str
    # input name -> (min, opt, max)
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shapes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.shapes.items()},
        }


def _point(spec: InputSpec, batch: int, seq: int, past: int) -> Shape:
    name = spec.name
    if name in ("input_ids", "position_ids"):
        return (batch, seq)
    if name == "attention_mask":
        return (batch, past + seq)
    if name.startswith("past_key_values."):
        _, heads, _, head_dim = spec.shape
        return (batch, heads, past, head_dim)
    raise BadInputError(
        f"the graph has an input '{name}' outside the qwen3-compile contract.",
        field="inputs",
        fix="build an artifact written by `qwen3-compile export` or `quantize`.",
    )


def generation_profiles(
    inputs: list[InputSpec], max_batch: int, max_seq: int, chunk: int = 512
) -> list[ShapeProfile]:
    """Prefill, decode and chunked-prefill profiles (min, opt, max) for batch 1..max_batch, up to max_seq
    tokens of context and prompt chunks of up to `chunk` tokens."""
    if max_batch < 1 or max_seq < 2:
        raise BadInputError(
            f"max batch {max_batch} / max sequence {max_seq} is too small.",
            field="--max-batch / --max-seq",
            fix="use --max-batch >= 1 and --max-seq >= 2.",
        )
    opt_batch, opt_seq, chunk = max(1, max_batch // 2), max(1, max_seq // 2), min(chunk, max_seq)
    points = {
        # (batch, new tokens, past tokens) at min, opt, max
        "prefill": ((1, 1, 0), (opt_batch, opt_seq, 0), (max_batch, max_seq, 0)),
        "decode": ((1, 1, 0), (opt_batch, 1, opt_seq), (max_batch, 1, max_seq - 1)),
        "chunked": ((1, 1, 0), (opt_batch, chunk, opt_seq), (max_batch, chunk, max_seq - 1)),
    }
    return [
        ShapeProfile(name, {spec.name: tuple(_point(spec, *p) for p in triple) for spec in inputs})
        for name, triple in points.items()
    ]


def profile_index(profiles: list[ShapeProfile], batch: int, seq: int, past: int) -> int:
    """The first profile whose ranges admit a call with these sizes (what a runner selects)."""
    for index, profile in enumerate(profiles):
        shapes = profile.shapes.items()
        actual = {name: _point(InputSpec(name, lo), batch, seq, past) for name, (lo, _, _) in shapes}
        if all(
            all(a <= b <= c for a, b, c in zip(lo, actual[name], hi, strict=True))
            for name, (lo, _, hi) in profile.shapes.items()
        ):
            return index
    raise BadInputError(
        f"no optimisation profile admits batch {batch} with {seq} new tokens after {past} cached ones.",
        field="profiles",
        fix="prefill the prompt in one call and decode one token at a time, within the engine's "
        "--max-batch/--max-seq (or rebuild with larger ones).",
    )


def profiles_from_records(records: Sequence[dict]) -> list[ShapeProfile]:
    """The profiles a build recorded (`EngineManifest.profiles`, in engine order)."""
    return [
        ShapeProfile(
            p["name"],
            {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in p["shapes"].items()},
        )
        for p in records
    ]
