"""W8A8 (SmoothQuant INT8, FP8), the fp16 baseline and the FP8 KV cache: calibration statistics against the
full transformers model, the quantized graph against a torch fake-quant model, the recipes' gates against
the fp32 reference, SmoothQuant against naive W8A8 on a model with massive activation channels."""

# The accuracy-gate tests validate with recipe_check=False: the graph against its recipe's fake-quantized
# model has its own tests (the graph-equals-fake-quant tests here, tests/validate/test_recipe_check.py).

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from qwen3_compile.backends.base import left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError
from qwen3_compile.export.stage import export_onnx
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.loading import load_model
from qwen3_compile.quantize.calibrate import calibrate
from qwen3_compile.quantize.calibration_data import load_calibration
from qwen3_compile.quantize.recipe import ActivationSpec, QuantRecipe, load_recipe, with_kv_cache
from qwen3_compile.quantize.stage import _check_stats, quantize_artifact
from qwen3_compile.tokenizer import load_tokenizer
from qwen3_compile.validate.recipe_reference import recipe_reference
from qwen3_compile.validate.stage import validate_artifact

from .presets import GATE_PRESETS

PRESETS = ("tiny-dense", "tiny-moe")


@pytest.fixture(scope="module")
def exports(artifacts):
    return {name: artifacts.export(name) for name in PRESETS}


@pytest.fixture(scope="module")
def quantized(artifacts):
    return {
        (preset, recipe): artifacts.quantized_artifact(preset, recipe)
        for preset in PRESETS
        for recipe in ("int8-sq", "fp8")
    }


def _initializers(directory) -> dict[str, np.ndarray]:
    model = onnx.load(str(directory / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("preset", PRESETS)
def test_layer_by_layer_calibration_equals_full_model(preset, exports):
    """Ranges gathered one layer at a time equal those hooked out of transformers' whole model."""
    arch = Qwen3Arch.from_config_file(exports[preset] / "config.json")
    texts = load_calibration(load_tokenizer(exports[preset]), samples=6, max_tokens=64)
    weights = _initializers(exports[preset])
    stats = calibrate(arch, weights.__getitem__, texts)

    model = load_model(preset).model
    seen: dict[str, list] = {}

    def record(key):
        return lambda module, args, *out: seen.setdefault(key, []).append(
            args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
        )

    last = model.model.layers[-1]
    last.self_attn.o_proj.register_forward_pre_hook(record("o_proj"))
    last.self_attn.v_proj.register_forward_hook(
        lambda m, a, out: seen.setdefault("v", []).append(out.abs().max())
    )
    if arch.is_moe:
        routed = []
        last.mlp.experts.register_forward_pre_hook(lambda m, a: routed.append(a[1].reshape(-1)))
    else:
        last.mlp.down_proj.register_forward_pre_hook(record("down"))
    with torch.no_grad():
        for ids in texts.sequences:
            model(torch.tensor([ids]))
    p = f"model.layers.{arch.num_layers - 1}."
    layer = stats.layers[-1]
    np.testing.assert_allclose(
        layer.act_amax[p + "self_attn.o_proj.weight"], torch.stack(seen["o_proj"]).amax(0).numpy(), rtol=1e-5
    )
    assert layer.value_amax == pytest.approx(float(torch.stack(seen["v"]).max()), rel=1e-5)
    if arch.is_moe:
        counts = torch.bincount(torch.cat(routed), minlength=arch.num_experts).numpy()
        np.testing.assert_array_equal(layer.expert_tokens, counts)
        assert counts.sum() == texts.tokens * arch.top_k
    else:
        np.testing.assert_allclose(
            layer.act_amax[p + "mlp.down_proj.weight"], torch.stack(seen["down"]).amax(0).numpy(), rtol=1e-5
        )


@pytest.mark.parametrize("recipe", ["int8-sq", "fp8"])
@pytest.mark.parametrize("preset", PRESETS)
def test_w8a8_graph_equals_torch_fake_quant(preset, recipe, quantized):
    """ONNX Runtime on the QDQ graph computes what transformers computes with the same weights and
    activations fake-quantized in torch (SmoothQuant scales folded the same way).

    Summation order differs between the two, so a value could land on the other side of a rounding
    boundary (or of a near-tied routing decision) and that sequence drift from there on: 12 independent
    sequences, at most one may drift (measured on tiny-moe int8-sq: 4 of 720 sequences drift, so two in one
    draw of 12 happens about once in 500 runs; a wrong saturation bound made 7 of 12 drift)."""
    artifact = quantized[(preset, recipe)]
    dtype = {"int8-sq": "int8", "fp8": "fp8"}[recipe]
    # the recipe's own model as validate builds it: checkpoint weights, recorded SmoothQuant scales and
    # activation ranges, torch's rounding and expert loop
    reference = recipe_reference(load_model(preset), artifact.directory, artifact.recipe).loaded.model
    ids = np.random.default_rng().integers(0, 151643, (12, 8))
    batch = left_padded_batch(ids.tolist(), 0)
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).logits.numpy()
        fp32 = load_model(preset).model(torch.from_numpy(ids)).logits.numpy()
    levels = ("basic", "all") if dtype == "fp8" else ("all",)
    for level in levels:  # FP8: ORT's higher optimisation levels must not change the numbers here
        runner = OrtRunner(artifact.directory / "model.onnx", optimization=level)
        got = runner.forward(
            batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(12)
        )[0]
        matching = np.abs(got - want).max(axis=(1, 2)) <= 2e-3
        assert matching.sum() >= 11, np.abs(got - want).max(axis=(1, 2))
        # and the quantization is really there: far from the float model
        assert np.abs(want - fp32).max() > 0.05
    graph = onnx.load(str(artifact.directory / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == artifact.manifest.calibration["activation_pairs"] > 0
    if preset == "tiny-moe":
        assert ops.count("QuantizedExpertDispatch") == 2 and "ExpertDispatch" not in ops
    assert artifact.manifest.ort_optimization == ("basic" if dtype == "fp8" else "all")


@pytest.mark.parametrize("recipe", ["int8-sq", "fp8"])
@pytest.mark.parametrize("preset", GATE_PRESETS)
def test_w8a8_meets_recipe_gates(preset, recipe, quantized, artifacts, tmp_path):
    artifact = quantized[(preset, recipe)]
    assert artifact.weight_ratio <= 0.55
    assert (artifact.directory / "calibration.safetensors").is_file()
    calibration = artifact.manifest.calibration
    assert calibration["tokens"] > 1000 and calibration["sequences"] == 40
    if preset == "tiny-moe":
        assert calibration["experts_reached"] == [16, 16]
    report = validate_artifact(  # the report goes to tmp_path: the artifact is shared
        artifact.directory,
        artifacts.loaded(preset),
        decode_steps=8,
        long_context_tokens=0,
        bisect=False,
        recipe_check=False,
        output=tmp_path / "v",
    )
    assert report.gates_source == f"recipe {recipe} (random-weight stress gates)"
    assert report.passed, report.failures


@pytest.mark.parametrize("preset", GATE_PRESETS)
def test_fp16_baseline_meets_gates(preset, artifacts, tmp_path):
    result = artifacts.quantized_artifact(preset, "fp16")  # of the fp16 export; shared: report to tmp_path
    assert result.tensors == [] and result.manifest.recipe["name"] == "fp16"
    assert result.manifest.options.dtype == "fp16"
    report = validate_artifact(
        result.directory,
        artifacts.loaded(preset),
        decode_steps=8,
        long_context_tokens=0,
        bisect=False,
        recipe_check=False,
        output=tmp_path / "v",
    )
    assert report.gates_source == "recipe fp16 (random-weight stress gates)" and report.passed, (
        report.failures
    )


@pytest.mark.slow  # two calibrated quantizations and validations of the outlier preset
def test_smoothquant_recovers_massive_activation_channels(tmp_path):
    """The `tiny-moe-outliers` preset: tiny-moe with three channels 60x larger at every RMSNorm output and
    the same float function. Naive per-tensor W8A8 loses the other channels' resolution; SmoothQuant's
    KL is at most a quarter of naive's."""
    loaded = load_model("tiny-moe-outliers")
    ids = torch.from_numpy(np.random.default_rng().integers(0, 151643, (2, 12)))
    with torch.no_grad():  # same function as tiny-moe, but with outliers at the norm outputs
        np.testing.assert_allclose(
            loaded.model(ids).logits.numpy(), load_model("tiny-moe").model(ids).logits.numpy(), atol=2e-4
        )
        assert loaded.model.model.layers[0].input_layernorm.weight.abs().max() > 30
    exported = export_onnx("tiny-moe-outliers", tmp_path / "export").directory
    sq = load_recipe("int8-sq")
    naive = QuantRecipe.from_dict(
        {k: v for k, v in sq.to_dict().items() if k != "smoothquant"} | {"name": "naive"}
    )
    prompts = tmp_path / "prompts.jsonl"  # a few of the suite's kinds: prose, code, math, other scripts
    prompts.write_text(
        "\n".join(
            json.dumps(text)
            for text in (
                "Why is the sky blue?",
                "Write a Python quicksort.",
                "Solve 3x + 5 = 20.",
                "用一句话介绍长城。",
            )
        )
    )
    kl = {}
    for recipe in (naive, sq):
        result = quantize_artifact(exported, recipe, tmp_path / recipe.name, samples=16)
        report = validate_artifact(
            result.directory,
            loaded,
            prompts=prompts,
            decode_steps=4,
            long_context_tokens=0,
            bisect=False,
            recipe_check=False,
        )
        kl[recipe.name] = report.summary("prefill").mean_kl
    assert kl["int8-sq"] <= kl["naive"] / 4, kl
    assert kl["naive"] > 0.2  # the outliers really hurt naive W8A8


def test_fp8_kv_cache_holds_e4m3_values(exports, artifacts, tmp_path):
    recipe = with_kv_cache(load_recipe("int8-wo"), "fp8")
    result = quantize_artifact(exports["tiny-moe"], recipe, tmp_path / "kv", samples=8)
    assert result.manifest.calibration["kv_cache_pairs"] == 4
    assert result.manifest.ort_optimization == "basic"
    weights = _initializers(result.directory)
    graph = onnx.load(str(result.directory / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    rng = np.random.default_rng()
    batch = left_padded_batch([rng.integers(0, 151643, 9).tolist()], 0)
    runner = OrtRunner(result.directory / "model.onnx", optimization="basic")
    _, present = runner.forward(
        batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(1)
    )
    concat = [n for n in graph.node if n.op_type == "Concat" and n.input[0].startswith("past_key_values.")]
    for node, cache in zip(concat, present, strict=True):
        scale = float(weights[producer[node.input[1]].input[1]])
        values = torch.from_numpy(cache / scale)  # on the E4M3 grid, up to fp32 rounding of q * scale / scale
        np.testing.assert_allclose(values.to(torch.float8_e4m3fn).float().numpy(), values.numpy(), rtol=1e-6)
        assert len(np.unique(values.numpy().round(3))) <= 253
    kv_amax = result.manifest.calibration["kv_amax"]
    assert all(k > 0 and v > 0 for k, v in kv_amax)
    report = validate_artifact(
        result.directory,
        artifacts.loaded("tiny-moe"),
        decode_steps=8,
        long_context_tokens=0,
        bisect=False,
        recipe_check=False,
    )
    assert report.gates_source == "recipe int8-wo+kv-fp8 (random-weight stress gates)" and report.passed, (
        report.failures
    )


def test_recipe_target_mismatch_names_fitting_recipes(exports, tmp_path):
    with pytest.raises(BadInputError) as info:
        quantize_artifact(exports["tiny-dense"], "fp8", tmp_path / "out", target="jetson-agx-orin")
    assert "fp8" in info.value.message and "jetson-agx-orin" in info.value.message
    assert "int8-sq" in info.value.fix and "fp8" not in info.value.fix
    kv8 = with_kv_cache(load_recipe("int8-wo"), "fp8")
    with pytest.raises(BadInputError) as info:  # an FP8 KV cache needs FP8 too
        quantize_artifact(exports["tiny-dense"], kv8, tmp_path / "out", target="jetson-orin-nano")
    assert "fp8" in info.value.message
    fp8_acts = replace(load_recipe("int8-sq"), activations=ActivationSpec(dtype="fp8"))  # FP8 activations too
    with pytest.raises(BadInputError) as info:
        quantize_artifact(exports["tiny-dense"], fp8_acts, tmp_path / "out", target="jetson-orin-nano")
    assert "fp8" in info.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, name, words",
    [
        ("", "empty.txt", "0 tokens"),
        ("Hi there.", "short.txt", "at least"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "bad.jsonl", "line 2"),
        ('{"prompt": 3}\n', "wrong.jsonl", "line 1"),
    ],
)
def test_bad_calibration_files(exports, tmp_path, content, name, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(BadInputError) as info:
        quantize_artifact(exports["tiny-dense"], "int8-sq", tmp_path / "out", calib=path)
    assert words in info.value.message and name in info.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, words", [(np.nan, "NaN"), (0.0, "only zeros")])
def test_degenerate_statistics_are_refused(exports, tmp_path, value, words, reseal):
    """A norm weight of NaN (an --allow-nonfinite export) or zeros gives ranges no scale can come from:
    refused, naming the layer and the weight."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exports["tiny-dense"], broken)
    model = onnx.load(str(broken / "model.onnx"))
    for t in model.graph.initializer:
        if t.name == "model.layers.1.post_attention_layernorm.weight":
            t.CopyFrom(numpy_helper.from_array(np.full(t.dims, value, np.float32), t.name))
    onnx.save(model, str(broken / "model.onnx"))
    reseal(broken)
    with pytest.raises(BadInputError) as info:
        quantize_artifact(broken, "int8-sq", tmp_path / "out", samples=4)
    assert "layer 1" in info.value.message and words in info.value.message
    assert "model.layers.1.mlp." in info.value.message
    assert not (tmp_path / "out").exists()


def test_cli_quantize_with_user_calibration(exports, tmp_path):
    calib = tmp_path / "calib.jsonl"
    answer = "The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29; 2 is the only even one."
    calib.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "List the first ten primes."}], "answer": answer}
        )
        + "\n"
    )
    result = CliRunner().invoke(
        main,
        [
            "quantize",
            str(exports["tiny-moe"]),
            "--recipe",
            "int8-sq",
            "--calib",
            str(calib),
            "--samples",
            "2",
            "-o",
            str(tmp_path / "q"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    calibration = data["calibration"]
    assert calibration["sequences"] == 2 and calibration["source"] == str(calib)  # both reasoning modes
    unreached = calibration["unreached_experts"]
    assert [16 - r for r in calibration["experts_reached"]] == [
        len(unreached.get(str(i), [])) for i in range(2)
    ]
    assert bool(data["warnings"]) == bool(unreached)


def test_unreached_experts_are_warned_about(exports):
    """Experts that calibration routed no token to are named (their weights are still quantized from
    their own ranges; only the shared activation range did not see them)."""
    arch = Qwen3Arch.from_config_file(exports["tiny-moe"] / "config.json")
    texts = load_calibration(load_tokenizer(exports["tiny-moe"]), samples=2, max_tokens=40)
    stats = calibrate(arch, _initializers(exports["tiny-moe"]).__getitem__, texts)
    stats.layers[1].expert_tokens[[2, 7]] = 0
    warnings = _check_stats(stats, load_recipe("int8-sq"), [])
    assert any("layer 1" in w and "[2, 7]" in w for w in warnings)
    assert stats.summary()["unreached_experts"]["1"] == [2, 7]


@pytest.mark.parametrize("recipe", ["int8-sq", pytest.param("fp8", marks=pytest.mark.slow)])
def test_w8a8_on_fp16_export_is_typed_fp16(recipe, artifacts, tmp_path):
    """The TensorRT input: an fp16 export quantized W8A8 (with an FP8 KV cache) has fp16 scales everywhere
    (QuantizeLinear's x and scale share a type; ORT refuses the model otherwise) and meets the recipe's gates
    against the fp32 PyTorch reference."""
    half = artifacts.export("tiny-moe", "fp16")
    result = quantize_artifact(half, with_kv_cache(load_recipe(recipe), "fp8"), tmp_path / "q", samples=8)
    weights = _initializers(result.directory)
    scales = [n for n in weights if n.endswith((".act_scale", ".scale"))]
    assert scales and all(weights[n].dtype == np.float16 for n in scales)
    report = validate_artifact(
        result.directory,
        artifacts.loaded("tiny-moe"),
        decode_steps=4,
        long_context_tokens=0,
        bisect=False,
        recipe_check=False,
    )
    assert report.gates_source == f"recipe {recipe}+kv-fp8 (random-weight stress gates)" and report.passed, (
        report.failures
    )
