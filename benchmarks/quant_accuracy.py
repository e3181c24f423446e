"""Accuracy per quantization recipe against the fp32 PyTorch reference, one run.

    python3 benchmarks/quant_accuracy.py [--models tiny-dense,tiny-moe] [--recipes int4-rtn,int4-awq]
        [--ppl-text HELD_OUT.txt] [--calibration FILE]

`NAME+lm-head-int8|int4` rows are the weight-only recipe with its output projection quantized as well
(`weights.lm_head`); "artifact MB" is model.onnx and its data file.

Each artifact is validated on the built-in prompt suite in both reasoning modes (prefill positions and
16 teacher-forced decode steps; no long-context case), as `qwen3-compile validate` does, and its
perplexity increase is measured on the built-in held-out text (`validate --ppl`) and, with --ppl-text, on
a second text (at most 64 windows of 256 tokens). The outlier rows
use the `tiny-moe-outliers` preset (massive activation channels, same float function as tiny-moe):
naive per-tensor W8A8 (int8-sq without its [smoothquant] section) against SmoothQuant, and INT4
round-to-nearest against AWQ. INT4 recipes run at group size 32 on the tiny presets (their 128 does
not divide the 64-wide layers); the rows say so (`-g32`). --calibration FILE calibrates the models' rows
on a user file (`quantize --calibration`) instead of the built-in set.
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
    ("artifact MB", "artifact_mb", ".2f"),
    ("mean KL", "mean_kl", ".4f"),
    ("top-1", "top1", ".3f"),
    ("ppl", "ppl", "s"),
    ("ppl +", "ppl_increase", "s"),
    ("ppl + (held-out corpus)", "ppl_increase_corpus", "s"),
    ("gates (KL / top-1 / ppl +)", "gates", "s"),
    ("passed", "passed", "s"),
]


PPL_TEXT: Path | None = None  # --ppl-text
CALIBRATION: Path | None = None  # --calibration
CORPUS_WINDOWS = 64


def _corpus_ppl_increase(directory: Path, reference: str) -> str:
    from qwen3_compile.backends.registry import open_runner
    from qwen3_compile.backends.torch_reference import TorchRunner
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.storage.manifest import read_manifest
    from qwen3_compile.tokenizer import load_tokenizer
    from qwen3_compile.validate.perplexity import PerplexityRequest, measure_perplexity

    if PPL_TEXT is None:
        return "-"
    result = measure_perplexity(
        TorchRunner(load_model(reference)),
        open_runner(directory, read_manifest(directory), "ort"),
        load_tokenizer(),
        PerplexityRequest(PPL_TEXT, max_windows=CORPUS_WINDOWS),
    )
    return f"{result.ppl_increase:+.2%}"


def _row(model: str, label: str, artifact, reference) -> dict:
    from qwen3_compile.validate.perplexity import PerplexityRequest
    from qwen3_compile.validate.stage import validate_artifact

    report = validate_artifact(
        artifact.directory, reference, long_context_tokens=0, bisect=False, perplexity=PerplexityRequest()
    )
    prefill, decode = report.summary("prefill"), report.summary("decode")
    positions = prefill.positions + decode.positions
    ppl, gates = report.perplexity, report.gates
    return {
        "model": model,
        "recipe": label,
        "weight_ratio": artifact.weight_ratio if artifact.tensors else 1.0,
        "artifact_mb": sum(f.stat().st_size for f in artifact.directory.glob("model.onnx*")) / 1e6,
        "mean_kl": (prefill.mean_kl * prefill.positions + decode.mean_kl * decode.positions) / positions,
        "top1": (prefill.top1 * prefill.positions + decode.top1 * decode.positions) / positions,
        "ppl": f"{ppl.reference_ppl:.2f} -> {ppl.artifact_ppl:.2f}",
        "ppl_increase": f"{ppl.ppl_increase:+.2%}",
        "ppl_increase_corpus": _corpus_ppl_increase(artifact.directory, reference),
        "gates": f"{gates.max_mean_kl} / {gates.min_top1} / "
        + (f"{gates.max_ppl_increase:.1%}" if gates.max_ppl_increase is not None else "-"),
        "passed": "yes" if report.passed else "no: " + "; ".join(report.failures),
    }


RECIPES = ("fp16", "int8-wo", "int8-sq", "fp8", "int8-wo+kv-fp8", "int4-rtn", "int4-awq")
# the weight-only recipes with their output projection quantized too (`weights.lm_head`)
LM_HEAD_RECIPES = (
    "int8-wo+lm-head-int8",
    "int4-rtn+lm-head-int8",
    "int4-rtn+lm-head-int4",
    "int4-awq+lm-head-int4",
)
INT4_TINY_GROUP = 32


def _recipe(name: str):
    from qwen3_compile.quantize.recipe import load_recipe, with_group_size, with_kv_cache, with_lm_head

    if name == "int8-wo+kv-fp8":
        return with_kv_cache(load_recipe("int8-wo"), "fp8")
    name, _, lm_head = name.partition("+lm-head-")
    recipe = load_recipe(name)
    recipe = with_group_size(recipe, INT4_TINY_GROUP) if recipe.weights.dtype == "int4" else recipe
    return with_lm_head(recipe, lm_head) if lm_head else recipe


def accuracy(model: str, work: Path, recipes: list[str]) -> list[dict]:
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.quantize.stage import quantize_artifact

    fp32 = export_onnx(model, work / "fp32").directory
    rows = []
    if "fp16" in recipes:
        fp16 = export_onnx(model, work / "fp16", ExportOptions(dtype="fp16")).directory
        rows.append(_row(model, "fp16", quantize_artifact(fp16, "fp16", work / "q-fp16"), model))
    for i, name in enumerate(r for r in recipes if r != "fp16"):
        recipe = _recipe(name)
        rows.append(
            _row(
                model, recipe.name, quantize_artifact(fp32, recipe, work / f"q-{i}", calib=CALIBRATION), model
            )
        )
    return rows


def outliers(work: Path, recipes: list[str]) -> list[dict]:
    from qwen3_compile.export.stage import export_onnx
    from qwen3_compile.quantize.recipe import QuantRecipe, load_recipe
    from qwen3_compile.quantize.stage import quantize_artifact

    exported = export_onnx("tiny-moe-outliers", work / "outliers-onnx").directory
    chosen = []
    if "int8-sq" in recipes:
        sq = load_recipe("int8-sq")
        naive = QuantRecipe.from_dict(
            {k: v for k, v in sq.to_dict().items() if k != "smoothquant"} | {"name": "naive W8A8"}
        )
        chosen += [naive, sq]
    chosen += [_recipe(r) for r in ("fp8", "int4-rtn", "int4-awq") if r in recipes]
    return [
        _row(
            "tiny-moe-outliers",
            recipe.name,
            quantize_artifact(exported, recipe, work / f"o-{i}"),
            "tiny-moe-outliers",
        )
        for i, recipe in enumerate(chosen)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny-dense,tiny-moe")
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help=f"a subset of {', '.join(RECIPES + LM_HEAD_RECIPES)}",
    )
    parser.add_argument("--ppl-text", type=Path, help="a second text for the perplexity increase")
    parser.add_argument("--calibration", type=Path, help="calibration text instead of the built-in set")
    parser.add_argument("--no-outliers", action="store_true", help="skip the tiny-moe-outliers rows")
    args = parser.parse_args()
    global PPL_TEXT, CALIBRATION
    PPL_TEXT, CALIBRATION = args.ppl_text, args.calibration
    recipes = args.recipes.split(",")
    unknown = sorted(set(recipes) - set(RECIPES + LM_HEAD_RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES + LM_HEAD_RECIPES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            rows += accuracy(model, Path(tmp) / model, recipes)
        if not args.no_outliers:
            rows += outliers(Path(tmp), recipes)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
