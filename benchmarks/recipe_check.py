"""How far a correct quantized artifact sits from its recipe's own fake-quantized model, and how far a
damaged one does: one run.

    python3 benchmarks/recipe_check.py [--models tiny-moe,trained-dense] [--factor 1.05] [--dtype fp16]

Each recipe's artifact (INT4 at group size 32) is validated (two prompts, both reasoning modes, 8
teacher-forced decode steps; ONNX Runtime CPU) as it is, and again with layer 1's down projection scaled by
--factor (its dequantization scales; the manifest resealed, as a producer that wrote wrong numbers). The
table gives validate's recipe check: the median over positions of the largest |logit error| against the
recipe's model, and the layer its bisection names. With --dtype fp16 the exports are fp16 and the table
adds the floor validate measures for them (the recipe's model in fp16 against itself in fp32) and the
tolerance it derives from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_export import markdown_table  # noqa: E402

RECIPES = ("int8-wo", "int8-sq", "fp8", "int8-wo+kv-fp8", "int4-rtn", "int4-awq")
PROMPTS = ['"Explain rotary embeddings."', '{"prompt": "def fibonacci(n):"}']
DAMAGED_LAYER = 1
COLUMNS = [
    ("model", "model", "s"),
    ("recipe", "recipe", "s"),
    ("correct: median max abs", "ok", ".2e"),
    ("damaged: median max abs", "bad", ".3g"),
    ("fp16 floor", "noise", ".3g"),
    ("tolerance", "tolerance", ".3g"),
    ("damaged: layer named", "layer", "s"),
]


def _recipe(name: str):
    from qwen3_compile.quantize.recipe import load_recipe, with_group_size, with_kv_cache

    base, _, kv = name.partition("+kv-")
    recipe = with_kv_cache(load_recipe(base), kv) if kv else load_recipe(base)
    return with_group_size(recipe, 32) if recipe.weights.dtype == "int4" else recipe


def _damaged(artifact: Path, out: Path, factor: float) -> Path:
    from qwen3_compile.storage.manifest import sha256_file

    shutil.copytree(artifact, out)
    model = onnx.load(out / "model.onnx")
    for t in model.graph.initializer:
        name = t.name
        if (
            name.startswith(f"model.layers.{DAMAGED_LAYER}.mlp.")
            and "down_proj" in name
            and name.endswith(".scale")
        ):
            scale = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((scale * factor).astype(scale.dtype), name))
    onnx.save(model, out / "model.onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["outputs"] = {
        n: {"sha256": sha256_file(out / n), "bytes": (out / n).stat().st_size} for n in manifest["outputs"]
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny-moe,trained-dense")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--factor", type=float, default=1.05)
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    args = parser.parse_args()
    from qwen3_compile.export.stage import ExportOptions, export_onnx
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.quantize.stage import quantize_artifact
    from qwen3_compile.validate.stage import validate_artifact

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = work / "prompts.jsonl"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        options = {"prompts": prompts, "decode_steps": 8, "long_context_tokens": 0}
        for model in args.models.split(","):
            loaded = load_model(model)
            exported = export_onnx(
                loaded, work / model / args.dtype, ExportOptions(dtype=args.dtype)
            ).directory
            for i, name in enumerate(args.recipes.split(",")):
                artifact = quantize_artifact(exported, _recipe(name), work / model / f"q{i}").directory
                ok = validate_artifact(
                    artifact, loaded, output=work / model / f"v{i}", **options
                ).recipe_check
                bad_dir = _damaged(artifact, work / model / f"d{i}", args.factor)
                bad = validate_artifact(
                    bad_dir, loaded, output=work / model / f"w{i}", **options
                ).recipe_check
                layer = bad.bisection.first_diverging_layer if bad.bisection else None
                rows.append(
                    {
                        "model": model,
                        "recipe": name,
                        "ok": ok.median_max_abs,
                        "bad": bad.median_max_abs,
                        "noise": ok.noise_median_max_abs
                        if ok.noise_median_max_abs is not None
                        else float("nan"),
                        "tolerance": ok.tolerance,
                        "layer": str(layer),
                    }
                )
                print(rows[-1], file=sys.stderr, flush=True)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
