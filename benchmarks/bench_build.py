"""TensorRT-RTX build benchmark: plan size, build time and peak RSS per input artifact, one run each.

    python3 benchmarks/bench_build.py [--models tiny-dense,tiny-moe] [--layers N[,N...]] [--inputs LIST]
                                      [--target rtx-blackwell] [--max-seq 4096]

Rows per model: the fp32 and fp16 exports and every built-in recipe the target runs
(`quantize.compat.fitting_recipes`; recipes the target cannot run are never quantized). `--layers 2` builds
real-width slices (e.g. `--models qwen3-30b-a3b --layers 1,2 --inputs fp16-export`); `--inputs` picks rows
(`fp32-export`, `fp16-export`, recipe names). Each export and each build runs in its own process, which
reports its own peak RSS; plans are built, never executed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_export import _run_child, markdown_table  # noqa: E402

_EXPORT = """
import json, sys
from qwen3_compile.export.stage import ExportOptions, export_onnx
export_onnx(sys.argv[1], sys.argv[2], ExportOptions(dtype=sys.argv[3]), num_layers=int(sys.argv[4]) or None)
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""
_BUILD = """
import json, sys
from qwen3_compile.engine import BuildOptions, build_engine
built = build_engine(sys.argv[1], BuildOptions(sys.argv[3], max_seq=int(sys.argv[4])), sys.argv[2])
print(json.dumps({"build_s": built.build_seconds, "plan_mb": built.plan_bytes / 1e6,
                  "moe": built.moe_lowering, "peak_rss_mb": peak_rss_mb()}))
"""

COLUMNS = [
    ("model", "model", "s"),
    ("input", "input", "s"),
    ("MoE lowering", "moe", "s"),
    ("ONNX MB", "onnx_mb", ".1f"),
    ("plan MB", "plan_mb", ".1f"),
    ("build s", "build_s", ".2f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
]


def inputs(model: str, layers: int | None, target: str, wanted: set[str] | None, work: Path):
    """(label, folder) of each artifact to build: the exports (each in a child, so the parent stays small),
    then the recipes `target` runs, quantized from the fp16 export (fp16 recipe) or the fp32 one."""
    from qwen3_compile.quantize.compat import fitting_recipes
    from qwen3_compile.quantize.recipe import load_recipe
    from qwen3_compile.quantize.stage import quantize_artifact
    from qwen3_compile.targets import get_target

    recipes = [r for r in fitting_recipes(get_target(target)) if wanted is None or r in wanted]
    sources = {"fp16" if load_recipe(r).weights.dtype == "fp16" else "fp32" for r in recipes}
    exports = {}
    for dtype in ("fp32", "fp16"):
        if dtype in sources or wanted is None or f"{dtype}-export" in wanted:
            folder = work / dtype
            done = _run_child(sys.executable, _EXPORT, model, str(folder), dtype, str(layers or 0))
            if "error" in done:
                raise RuntimeError(f"{model} {dtype} export failed: {done['error']}")
            exports[dtype] = folder
    out = [(f"{d} export", p) for d, p in exports.items() if wanted is None or f"{d}-export" in wanted]
    for name in recipes:
        source = exports["fp16" if load_recipe(name).weights.dtype == "fp16" else "fp32"]
        out.append((name, quantize_artifact(source, name, work / f"q-{name}").directory))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny-dense,tiny-moe")
    parser.add_argument("--layers", default="", help="real-width slices of N layers (comma list; all: none)")
    parser.add_argument("--inputs", default="", help="rows: fp32-export, fp16-export, recipe names")
    parser.add_argument("--target", default="rtx-blackwell")
    parser.add_argument("--max-seq", type=int, default=4096)
    args = parser.parse_args()
    wanted = {i for i in args.inputs.split(",") if i} or None
    depths = [int(n) for n in args.layers.split(",") if n] or [None]
    rows = []
    for model in args.models.split(","):
        for layers in depths:
            label = model if layers is None else f"{model}, {layers} layer{'s' * (layers > 1)}"
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                for name, path in inputs(model, layers, args.target, wanted, work):
                    engine = work / f"engine-{name.replace(' ', '-')}"
                    result = _run_child(
                        sys.executable, _BUILD, str(path), str(engine), args.target, str(args.max_seq)
                    )
                    onnx_mb = sum(f.stat().st_size for f in path.glob("model.onnx*")) / 1e6
                    rows.append({"model": label, "input": name, "onnx_mb": onnx_mb, **result})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"target {args.target}, --max-seq {args.max_seq}, --max-batch 1\n")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
