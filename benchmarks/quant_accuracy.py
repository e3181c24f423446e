"""Accuracy per quantization recipe against the fp32 PyTorch reference, one run.

    python3 benchmarks/quant_accuracy.py [--models tiny-dense,tiny-moe]

Each artifact is validated on the built-in prompt suite in both reasoning modes (prefill positions and
16 teacher-forced decode steps; no long-context case), as `qwen3-compile validate` does. The outlier rows
use the `tiny-moe-outliers` preset (massive activation channels, same float function as tiny-moe):
naive per-tensor W8A8 (int8-sq without its [smoothquant] section) against SmoothQuant.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_export import markdown_table  # noqa: E402

COLUMNS = [
    ("model", "model", "s"),
    ("recipe", "recipe", "s"),
    ("weights vs fp16", "weight_ratio", ".2f"),
    ("mean KL", "mean_kl", ".4f"),
    ("top-1", "top1", ".3f"),
    ("gates (KL / top-1)", "gates", "s"),
    ("passed", "passed", "s"),
]


def _row(model: str, label: str, artifact, reference) -> dict:
    from qwen3_compile.validate.stage import validate_artifact

    report = validate_artifact(artifact.directory, reference, long_context_tokens=0, bisect=False)
    prefill, decode = report.summary("prefill"), report.summary("decode")
    positions = prefill.positions + decode.positions
    return {
        "model": model,
        "recipe": label,
        "weight_ratio": artifact.weight_ratio if artifact.tensors else 1.0,
        "mean_kl": (prefill.mean_kl * prefill.positions + decode.mean_kl * decode.positions) / positions,
        "top1": (prefill.top1 * prefill.positions + decode.top1 * decode.positions) / positions,
        "gates": f"{report.gates.max_mean_kl} / {report.gates.min_top1}",
        "passed": "yes" if report.passed else "no: " + "; ".join(report.failures),
    }


def accuracy(model: str, work: Path) -> list[dict]:
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.quantize.recipe import load_recipe, with_kv_cache
    from qwen3_compile.quantize.stage import quantize_artifact

    fp32 = export_onnx(model, work / "fp32").directory
    fp16 = export_onnx(model, work / "fp16", ExportOptions(dtype="fp16")).directory
    rows = [_row(model, "fp16", quantize_artifact(fp16, "fp16", work / "q-fp16"), model)]
    for recipe in ("int8-wo", "int8-sq", "fp8"):
        rows.append(_row(model, recipe, quantize_artifact(fp32, recipe, work / f"q-{recipe}"), model))
    kv = with_kv_cache(load_recipe("int8-wo"), "fp8")
    rows.append(_row(model, kv.name, quantize_artifact(fp32, kv, work / "q-kv"), model))
    return rows


def outliers(work: Path) -> list[dict]:
    from qwen3_compile.export.stage import export_onnx
    from qwen3_compile.quantize.recipe import QuantRecipe, load_recipe
    from qwen3_compile.quantize.stage import quantize_artifact

    exported = export_onnx("tiny-moe-outliers", work / "outliers-onnx").directory
    sq = load_recipe("int8-sq")
    naive = QuantRecipe.from_dict(
        {k: v for k, v in sq.to_dict().items() if k != "smoothquant"} | {"name": "naive W8A8"}
    )
    return [
        _row(
            "tiny-moe-outliers",
            recipe.name,
            quantize_artifact(exported, recipe, work / f"o-{i}"),
            "tiny-moe-outliers",
        )
        for i, recipe in enumerate((naive, sq, load_recipe("fp8")))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny-dense,tiny-moe")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            rows += accuracy(model, Path(tmp) / model)
        rows += outliers(Path(tmp))
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
