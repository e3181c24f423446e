"""Validation cost: the logit comparison alone and one whole `validate`, timed the same way in one run.

    python3 benchmarks/bench_validate.py [--positions 600] [--repeats 3]

1. `compare_logits` on two [positions, 151936] fp32 logit arrays (fresh random, the second a noisy copy):
   wall time per call, median and range of `--repeats` calls after one warm-up call.
2. `validate_artifact` of the tiny-moe fp32 export against its preset (built-in prompt suite, both
   reasoning modes, 8 decode steps, no long-context case, no bisection): wall time, median and range of
   `--repeats` runs after one warm-up run (which also pays the imports).

Run it at two commits with the same arguments to compare implementations: same script, same timer
(time.perf_counter), same warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _row(name: str, times: list[float]) -> str:
    return f"| {name} | {statistics.median(times):.2f} | {min(times):.2f}-{max(times):.2f} | {len(times)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from qwen3_compile.export.stage import export_onnx
    from qwen3_compile.validate.metrics import compare_logits
    from qwen3_compile.validate.stage import validate_artifact

    rng = np.random.default_rng()
    reference = (rng.standard_normal((args.positions, 151936)) * 3).astype(np.float32)
    artifact = reference + (rng.standard_normal(reference.shape) * 0.01).astype(np.float32)
    rows = [
        _row(
            f"compare_logits, {args.positions} positions",
            _timed(lambda: compare_logits(reference, artifact), args.repeats),
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx("tiny-moe", Path(tmp) / "export").directory

        def validate() -> None:
            validate_artifact(
                exported, "tiny-moe", decode_steps=8, long_context_tokens=0, bisect=False,
                output=Path(tmp) / "report", force=True,
            )  # fmt: skip

        rows.append(_row("validate tiny-moe (fp32 export)", _timed(validate, args.repeats)))
    print("| what | median s | range s | runs |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
