"""Where one decode step's time goes: ONNX Runtime's per-node profile of an exported artifact.

    python3 benchmarks/profile_decode.py [--model qwen3-30b-a3b --layers 2] [--past 128] [--steps 10]

Exports MODEL lowered for ORT into a temporary folder, runs `steps` single-token decode steps over a
random KV cache of `past` positions, and prints the mean step time and the slowest nodes per step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import onnxruntime as ort

    from qwen3_compile.export.stage import export_onnx
    from qwen3_compile.graph_contract import past_names
    from qwen3_compile.lower.stage import lower_artifact

    with tempfile.TemporaryDirectory() as tmp:
        canonical = export_onnx(args.model, Path(tmp) / "canonical", num_layers=args.layers)
        artifact = lower_artifact(canonical.directory, Path(tmp) / "ort", "ort")
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(artifact.model_path), options)
        past = session.get_inputs()[3].shape
        feeds = {
            "input_ids": np.array([[5]]),
            "attention_mask": np.ones((1, args.past + 1), np.int64),
            "position_ids": np.array([[args.past]]),
        }
        rng = np.random.default_rng(0)
        for i in range(args.layers):
            for name in past_names(i):
                feeds[name] = rng.standard_normal((1, past[1], args.past, past[3])).astype(np.float32)
        warmup = 3
        for _ in range(warmup):
            session.run(None, feeds)
        start = time.perf_counter()
        for _ in range(args.steps):
            session.run(None, feeds)
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[event["name"].removesuffix("_kernel_time")] += event["dur"] / (warmup + args.steps) / 1e3
    print(f"{args.model} ({args.layers} layers), past {args.past}: {step_ms:.1f} ms per decode step")
    for name, ms in sorted(per_node.items(), key=lambda item: -item[1])[:8]:
        print(f"  {name:40s} {ms:7.2f} ms")


if __name__ == "__main__":
    main()
