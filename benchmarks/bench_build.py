"""TensorRT-RTX build benchmark: plan size, build time and peak RSS per input artifact, one run each.

    python3 benchmarks/bench_build.py [--models tiny-dense,tiny-moe] [--target rtx-blackwell] [--max-seq 4096]

Rows per model: the fp32 and fp16 exports and every built-in recipe the target supports. Each build runs in
its own process (`qwen3-compile build`), so its peak RSS is its own. Plans are built, never executed.
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

_BUILD = """
import json, sys
from qwen3_compile.build import BuildOptions, build_engine
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


def inputs(model: str, target: str, work: Path) -> list[tuple[str, Path]]:
    from qwen3_compile.build.inputs import check_target_supports, read_build_input
    from qwen3_compile.errors import BadInputError
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.quantize.recipe import builtin_recipes, load_recipe
    from qwen3_compile.quantize.stage import quantize_artifact
    from qwen3_compile.targets import get_target

    exports = {d: export_onnx(model, work / d, ExportOptions(dtype=d)).directory for d in ("fp32", "fp16")}
    out = [(f"{d} export", path) for d, path in exports.items()]
    for name in sorted(builtin_recipes()):
        recipe = load_recipe(name)
        source = exports["fp16" if recipe.weights.dtype == "fp16" else "fp32"]
        quantized = quantize_artifact(source, recipe, work / f"q-{name}").directory
        try:
            check_target_supports(read_build_input(quantized), get_target(target))
        except BadInputError:
            continue
        out.append((name, quantized))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny-dense,tiny-moe")
    parser.add_argument("--target", default="rtx-blackwell")
    parser.add_argument("--max-seq", type=int, default=4096)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            work = Path(tmp) / model
            for label, path in inputs(model, args.target, work):
                engine = work / f"engine-{label.replace(' ', '-')}"
                result = _run_child(
                    sys.executable, _BUILD, str(path), str(engine), args.target, str(args.max_seq)
                )
                onnx_mb = sum(f.stat().st_size for f in path.glob("model.onnx*")) / 1e6
                rows.append({"model": model, "input": label, "onnx_mb": onnx_mb, **result})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"target {args.target}, --max-seq {args.max_seq}, --max-batch 1\n")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
