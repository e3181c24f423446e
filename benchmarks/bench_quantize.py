"""Quantization benchmark: quantize time and peak RSS, ONNX Runtime CPU decode per recipe, one run.

    python3 benchmarks/bench_quantize.py [--models tiny-moe,tiny-dense] [--layers N] [--rows KEY,...]
        [--group-size G]

Rows per model: the fp32 and fp16 exports; int8-wo (canonical QDQ and lowered for ORT, where INT8
experts run as QMoE); int8-sq and fp8 (W8A8: calibration included in the quantize time; MoE experts run
densely through the QuantizedExpertDispatch function body on ORT). Each artifact runs at the ONNX Runtime
optimisation level and session config its manifest records (`ort_optimization`: fp8 asks for
ORT_ENABLE_BASIC; `ort_session_config`: the QDQ graph run as written). Two more rows run int8-wo and int8-sq
as `quantize --ort-qdq fused` records it (ORT's int8 fusions), side by side. INT4 (int4-rtn, group 128 or
--group-size) runs canonical (DequantizeLinear -> MatMul, dequantized once at load) and lowered for ORT
(MatMulNBits, INT4 experts as QMoE), and lowered with its lm_head INT4 as well (`weights.lm_head`). Each
quantization runs in its own process, which reports its own peak RSS; "quantized vs fp16" is the
quantized tensors' bytes (values + scales) over the same tensors in fp16. `--rows` picks rows by key
(fp16, int8-wo, int8-wo:ort, int8-sq, fp8, int4-rtn, int4-rtn:ort, int4-rtn+lm-head-int4:ort); the fp32 row
always runs.
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
from qwen3_compile.quantize.recipe import load_recipe, with_group_size, with_lm_head
from qwen3_compile.quantize.stage import quantize_artifact
name, _, lm_head = sys.argv[2].partition("+lm-head-")
recipe = load_recipe(name)
if int(sys.argv[5]) and recipe.weights.granularity == "per_group":
    recipe = with_group_size(recipe, int(sys.argv[5]))
recipe = with_lm_head(recipe, lm_head) if lm_head else recipe
start = time.perf_counter()
out = sys.argv[3] + ("-canonical" if sys.argv[4] else "")
result = quantize_artifact(sys.argv[1], recipe, out)
if sys.argv[4]:  # the lowered copy is what the row runs; the time counts both stages
    lower_artifact(out, sys.argv[3], sys.argv[4])
print(json.dumps({"seconds": time.perf_counter() - start, "weight_ratio": result.weight_ratio,
                  "peak_rss_mb": peak_rss_mb()}))
"""

RECIPE_ROWS = (  # (key, recipe, lowering, label)
    ("int8-wo", "int8-wo", "", "int8-wo (canonical QDQ)"),
    ("int8-wo:ort", "int8-wo", "ort", "int8-wo, lower --for ort (QMoE)"),
    ("int8-sq", "int8-sq", "", "int8-sq (SmoothQuant W8A8)"),
    ("fp8", "fp8", "", "fp8 (E4M3 W8A8)"),
    ("int4-rtn", "int4-rtn", "", "int4-rtn (canonical QDQ)"),
    ("int4-rtn:ort", "int4-rtn", "ort", "int4-rtn, lower --for ort (MatMulNBits, QMoE)"),
    ("int4-rtn+lm-head-int4:ort", "int4-rtn+lm-head-int4", "ort", "int4-rtn + INT4 lm_head, lower --for ort"),
)
ROW_KEYS = ("fp16",) + tuple(key for key, *_ in RECIPE_ROWS)


def bench(
    model: str, work: Path, layers: int | None = None, keys: tuple[str, ...] = ROW_KEYS, group_size: int = 0
) -> list[dict]:
    from qwen3_compile.backends.onnxruntime.runner import OrtRunner
    from qwen3_compile.backends.onnxruntime.settings import ORT_QDQ
    from qwen3_compile.backends.registry import open_runner
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.lower.stage import lower_artifact
    from qwen3_compile.storage.manifest import read_manifest

    fp32 = export_onnx(model, work / "fp32", num_layers=layers).directory
    name = model if layers is None else f"{model} ({layers} layers)"
    rows = [
        {
            "model": name,
            "artifact": "fp32 export (ORT MoE lowering)",
            "path": lower_artifact(fp32, work / "fp32-ort", "ort").directory,
        },
    ]
    if "fp16" in keys:
        fp16 = export_onnx(model, work / "fp16", ExportOptions(dtype="fp16"), num_layers=layers).directory
        rows.append({"model": name, "artifact": "fp16 export (canonical)", "path": fp16})
    for key, recipe, target, label in RECIPE_ROWS:
        if key not in keys:
            continue
        out = work / key.replace(":", "-")
        rows.append(
            {
                "model": name,
                "artifact": label,
                "path": out,
                **_run_child(sys.executable, _QUANTIZE, str(fp32), recipe, str(out), target, str(group_size)),
            }
        )
    for label in ("int8-wo (canonical QDQ)", "int8-sq (SmoothQuant W8A8)"):
        row = next((row for row in rows if row["artifact"] == label), None)
        if row is None or "error" in row:
            continue
        fused = {"artifact": f"{label}, --ort-qdq fused", "fused": True}
        same = {k: v for k, v in row.items() if k not in ("seconds", "peak_rss_mb")}  # one quantization
        rows.insert(rows.index(row) + 1, same | fused)
    for row in rows:
        if "error" in row:
            print(f"{name}, {row['artifact']}: {row['error']}", file=sys.stderr)
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
    ("quantized vs fp16", "weight_ratio", ".3f"),
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
    parser.add_argument("--rows", default=",".join(ROW_KEYS), help=f"a subset of {', '.join(ROW_KEYS)}")
    parser.add_argument(
        "--group-size", type=int, default=0, help="INT4 group size (default: the recipe's 128; tiny: 32)"
    )
    args = parser.parse_args()
    keys = tuple(args.rows.split(","))
    unknown = sorted(set(keys) - set(ROW_KEYS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROW_KEYS)}")
    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench(model, Path(tmp), args.layers, keys, args.group_size)
            print(markdown_table(rows, QUANTIZE_COLUMNS), flush=True)
    print(markdown_table(rows, QUANTIZE_COLUMNS))


if __name__ == "__main__":
    main()
