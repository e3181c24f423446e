"""Bundle size, time and peak RSS: tiny-moe quantized with int8-sq, validated, bundled for jetson-agx-orin.

    python3 benchmarks/bench_bundle.py

The bundle runs in a child process so its peak RSS is its own.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_export import _run_child, markdown_table  # noqa: E402

_BUNDLE = """
import json, sys, time
from qwen3_compile.bundle import bundle_artifact
start = time.perf_counter()
result = bundle_artifact(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "mb": result.bytes / 1e6,
                  "files": len(result.manifest["files"]), "moe": result.manifest["moe"]["lowering"],
                  "peak_rss_mb": peak_rss_mb()}))
"""

COLUMNS = [
    ("bundle", "label", "s"),
    ("MoE lowering", "moe", "s"),
    ("bundle MB", "mb", ".1f"),
    ("files", "files", "d"),
    ("bundle s", "seconds", ".1f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
]


def main() -> None:
    from qwen3_compile.export.stage import export_onnx
    from qwen3_compile.quantize.stage import quantize_artifact
    from qwen3_compile.validate.stage import validate_artifact

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        quantized = quantize_artifact(
            export_onnx("tiny-moe", work / "export").directory, "int8-sq", work / "q"
        )
        validate_artifact(quantized.directory, "tiny-moe", long_context_tokens=0, bisect=False)
        row = _run_child(
            sys.executable, _BUNDLE, str(quantized.directory), "jetson-agx-orin", str(work / "b.tar.gz")
        )
        row["label"] = "tiny-moe int8-sq (fp32 export) for jetson-agx-orin"
    print(markdown_table([row], COLUMNS))


if __name__ == "__main__":
    main()
