"""Quantization at real width: peak RSS and time of `int8-sq` (calibration layer by layer, weights
streamed tensor by tensor) on Qwen3-30B-A3B slices of growing depth, one run.

    python3 benchmarks/bench_quantize_scale.py [--layers 2,6] [--samples 16]

Each slice is exported in fp16 (the TensorRT input; streamed to external data), then quantized in a
child process whose peak RSS is its own. Bounded memory means the peak stays flat while the weights grow.
Needs about 1.3 GB of disk per layer for the export and 0.7 GB for the quantized copy.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_export import _run_child, markdown_table  # noqa: E402

_QUANTIZE = """
import json, sys, time
from qwen3_compile.quantize.stage import quantize_artifact
start = time.perf_counter()
result = quantize_artifact(sys.argv[1], "int8-sq", sys.argv[2], samples=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - start,
                  "calibrate_s": result.manifest.timings_s.get("calibrate"),
                  "tokens": result.manifest.calibration["tokens"],
                  "peak_rss_mb": peak_rss_mb()}))
"""

COLUMNS = [
    ("model", "model", "s"),
    ("fp16 weights GB", "weights_gb", ".1f"),
    ("calibration tokens", "tokens", "d"),
    ("quantize s", "seconds", ".1f"),
    ("of which calibrate s", "calibrate_s", ".1f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("peak / weights", "ratio", ".2f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default="2,6")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    from qwen3_compile.export.stage import ExportOptions, export_onnx

    rows = []
    for layers in (int(n) for n in args.layers.split(",")):
        with tempfile.TemporaryDirectory(dir=HERE.parent / "artifacts") as tmp:
            exported = export_onnx(
                "qwen3-30b-a3b", Path(tmp) / "export", ExportOptions(dtype="fp16"), num_layers=layers
            ).directory
            weights = sum(f.stat().st_size for f in exported.glob("model.onnx*")) / 1e9
            row = _run_child(
                sys.executable, _QUANTIZE, str(exported), str(Path(tmp) / "q"), str(args.samples)
            )
            row |= {"model": f"Qwen3-30B-A3B, {layers} layers", "weights_gb": weights}
            if "peak_rss_mb" in row:
                row["ratio"] = row["peak_rss_mb"] / 1e3 / weights
            rows.append(row)
            shutil.rmtree(tmp, ignore_errors=True)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
