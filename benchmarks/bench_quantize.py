"""Quantization benchmark: quantize time and peak RSS, ONNX Runtime CPU decode per recipe, one run.

    python3 benchmarks/bench_quantize.py [--models tiny-moe,tiny-dense] [--layers N]

Rows per model: the fp32 and fp16 exports; int8-wo (canonical QDQ and lowered for ORT, where INT8
experts run as QMoE); int8-sq and fp8 (W8A8: calibration included in the quantize time; MoE experts run
densely through the QuantizedExpertDispatch function body on ORT). Each artifact runs at the ONNX Runtime
optimisation level and session config its manifest records (`ort_optimization`: fp8 asks for
ORT_ENABLE_BASIC; `ort_session_config`: the QDQ graph run as written). Two more rows run int8-wo and int8-sq
as `quantize --ort-qdq fused` records it (ORT's int8 fusions), side by side. Each quantization runs in its own
process, which reports its own peak RSS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_export import _run_child, graph_stats, markdown_table, time_runner  # noqa: E402

_QUANTIZE = """
import json, sys, time
from qwen3_compile.lower.stage import lower_artifact
from qwen3_compile.quantize.stage import quantize_artifact
start = time.perf_counter()
out = sys.argv[3] + ("-canonical" if sys.argv[4] else "")
quantize_artifact(sys.argv[1], sys.argv[2], out)
if sys.argv[4]:  # the lowered copy is what the row runs; the time counts both stages
    lower_artifact(out, sys.argv[3], sys.argv[4])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def bench(model: str, work: Path, layers: int | None = None) -> list[dict]:
    from qwen3_compile.backends.onnxruntime.runner import OrtRunner
    from qwen3_compile.backends.onnxruntime.settings import ORT_QDQ
    from qwen3_compile.backends.registry import open_runner
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.lower.stage import lower_artifact
    from qwen3_compile.storage.manifest import read_manifest

    fp32 = export_onnx(model, work / "fp32", num_layers=layers).directory
    fp16 = export_onnx(model, work / "fp16", ExportOptions(dtype="fp16"), num_layers=layers).directory
    name = model if layers is None else f"{model} ({layers} layers)"
    rows = [
        {
            "model": name,
            "artifact": "fp32 export (ORT MoE lowering)",
            "path": lower_artifact(fp32, work / "fp32-ort", "ort").directory,
        },
        {"model": name, "artifact": "fp16 export (canonical)", "path": fp16},
    ]
    recipes = (
        ("int8-wo", "", "int8-wo (canonical QDQ)"),
        ("int8-wo", "ort", "int8-wo, lower --for ort (QMoE)"),
        ("int8-sq", "", "int8-sq (SmoothQuant W8A8)"),
        ("fp8", "", "fp8 (E4M3 W8A8)"),
    )
    for recipe, target, label in recipes:
        out = work / f"{recipe}-{target or 'canonical'}"
        rows.append(
            {
                "model": name,
                "artifact": label,
                "path": out,
                **_run_child(sys.executable, _QUANTIZE, str(fp32), recipe, str(out), target),
            }
        )
    for label in ("int8-wo (canonical QDQ)", "int8-sq (SmoothQuant W8A8)"):
        row = next(row for row in rows if row["artifact"] == label)
        fused = {"artifact": f"{label}, --ort-qdq fused", "fused": True}
        same = {k: v for k, v in row.items() if k not in ("seconds", "peak_rss_mb")}  # one quantization
        rows.insert(rows.index(row) + 1, same | fused)
    for row in rows:
        if "error" in row:
            continue
        if row.get("fused"):  # what `quantize --ort-qdq fused` would record (same graph and weights)
            runner = OrtRunner(row["path"] / "model.onnx", session_config=ORT_QDQ["fused"])
        else:  # as the manifest asks (fp8: basic; quantized: the QDQ graph as written)
            runner = open_runner(row["path"], read_manifest(row["path"]))
        row |= graph_stats(row["path"] / "model.onnx") | time_runner(runner)
    return rows


QUANTIZE_COLUMNS = [
    ("model", "model", "s"),
    ("artifact", "artifact", "s"),
    ("quantize s", "seconds", ".1f"),
    ("quantize peak RSS MB", "peak_rss_mb", ".0f"),
    ("file MB", "file_mb", ".1f"),
    ("prefill 128 ms", "prefill_ms", ".1f"),
    ("decode tok/s", "decode_tok_s", ".1f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny-moe,tiny-dense")
    parser.add_argument("--layers", type=int, default=None, help="export only the first N decoder layers")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench(model, Path(tmp), args.layers)
    print(markdown_table(rows, QUANTIZE_COLUMNS))


if __name__ == "__main__":
    main()
