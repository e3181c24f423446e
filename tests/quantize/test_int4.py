"""INT4 weight-only (int4-rtn): the packed INT4 initializers against an independent numpy quantizer (bytes
unpacked here, not by the code under test), one layer's DequantizeLinear -> MatMul on ONNX Runtime against
numpy, the whole graph against transformers with the same weights fake-quantized in numpy, the recipe's
gates against the fp32 reference, and group sizes that do not fit refused before any work."""

# The accuracy-gate tests validate with recipe_check=False: the graph against its recipe's fake-quantized
# model has its own tests (the graph-equals-fake-quant tests here, tests/validate/test_recipe_check.py).

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.backends.base import left_padded_batch
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError
from qwen3_compile.models.loading import load_model
from qwen3_compile.quantize.recipe import load_recipe, with_group_size
from qwen3_compile.quantize.stage import quantize_artifact
from qwen3_compile.validate.stage import validate_artifact

from .presets import GATE_PRESETS

PRESETS = ("tiny-dense", "tiny-moe")
GROUP = 32  # the tiny presets' MoE down_proj reads 32 channels: int4-rtn's 128 does not divide it


def reference_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 per group of `group` consecutive values along the LAST axis, written for this test:
    scale = max|w| / 7, q = round half to even, saturated to [-8, 7]. Returns (q int8, scale)."""
    g = w.astype(np.float64).reshape(*w.shape[:-1], w.shape[-1] // group, group)
    scale = (np.abs(g).max(axis=-1, keepdims=True) / 7).astype(np.float32)
    scale[scale == 0] = 1
    q = np.clip(np.round(g / scale.astype(np.float64)), -8, 7)  # np.round: half to even
    return q.reshape(w.shape).astype(np.int8), scale[..., 0]


def unpack_onnx_int4(proto: onnx.TensorProto) -> np.ndarray:
    """ONNX INT4 raw bytes -> int8 values: two a byte, the first in the low nibble, sign-extended."""
    raw = np.frombuffer(proto.raw_data, np.uint8)
    count = int(np.prod(proto.dims))
    low, high = (raw & 0x0F).astype(np.int16), (raw >> 4).astype(np.int16)
    nibbles = np.stack([low, high], axis=1).reshape(-1)[:count]
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(tuple(proto.dims))


@pytest.fixture(scope="module")
def int4(artifacts):
    """int4-rtn at group size 32 (GROUP) of both presets' fp32 exports: the shared ones (read-only)."""
    quantized = {p: artifacts.quantized_artifact(p, "int4-rtn") for p in PRESETS}
    assert all(q.recipe.weights.group_size == GROUP for q in quantized.values())
    return quantized


def _graph(artifact) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    model = onnx.load(str(artifact.directory / "model.onnx"))
    return model, {t.name: t for t in model.graph.initializer}


def _original(artifacts, preset: str) -> dict[str, np.ndarray]:
    model = onnx.load(str(artifacts.export(preset) / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _as_last_axis_input(w: np.ndarray) -> np.ndarray:
    """Stored linear weights are [in, out]: transposed so the input axis is last, as experts store it."""
    return w.T if w.ndim == 2 else w


@pytest.mark.parametrize("preset", PRESETS)
def test_int4_initializers_equal_numpy_reference(preset, int4, artifacts):
    artifact = int4[preset]
    model, inits = _graph(artifact)
    original = _original(artifacts, preset)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(artifact.tensors) == (14 if preset == "tiny-dense" else 12)
    assert not any(t.name.startswith(("lm_head", "model.embed")) for t in artifact.tensors)
    assert not any(".mlp.gate.weight" in t.name for t in artifact.tensors)  # the router stays float
    for node in dq:
        values, scale = node.input  # symmetric: no zero point
        stored = values.removesuffix(".q")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = original[stored]
        assert attrs == {"axis": 0 if w.ndim == 2 else 2, "block_size": GROUP}
        assert inits[values].data_type == TensorProto.INT4 and len(inits[values].raw_data) == w.size // 2
        want_q, want_scale = reference_int4(_as_last_axis_input(w), GROUP)
        got_q = _as_last_axis_input(unpack_onnx_int4(inits[values]))
        got_scale = _as_last_axis_input(numpy_helper.to_array(inits[scale]))
        np.testing.assert_allclose(got_scale, want_scale, rtol=1e-6)
        np.testing.assert_array_equal(got_q, want_q)
        assert got_q.min() >= -7 and got_q.max() == 7  # symmetric grid: -8 never occurs
    assert artifact.weight_ratio <= 0.32  # 4 bits + an fp32 scale per 32 weights, against 16 bits


def _one_matmul(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], width: int) -> onnx.ModelProto:
    """The artifact's own DequantizeLinear node and its initializers, feeding a MatMul of a fresh input."""
    matmul = helper.make_node("MatMul", ["x", node.output[0]], ["y"])
    graph = helper.make_graph(
        [node, matmul],
        "one_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [inits[i] for i in node.input],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_int4_matmul_equals_numpy(int4, artifacts):
    """One layer's DequantizeLinear(INT4, blocked) -> MatMul on ONNX Runtime CPU is x @ dequant(W) in numpy,
    with W dequantized from the independently unpacked bytes and scales."""
    import onnxruntime as ort

    from qwen3_compile.backends.onnxruntime.settings import ORT_QDQ, session_options

    model, inits = _graph(int4["tiny-dense"])
    name = "model.layers.1.self_attn.o_proj.weight.T"
    node = next(n for n in model.graph.node if n.input[0] == name + ".q")
    q = unpack_onnx_int4(inits[name + ".q"]).astype(np.float64)  # [in, out]
    scale = numpy_helper.to_array(inits[name + ".scale"]).astype(np.float64)  # [in / 32, out]
    w = q * np.repeat(scale, GROUP, axis=0)
    x = np.random.default_rng().standard_normal((7, q.shape[0])).astype(np.float32)
    for level in ("disabled", "all"):  # as written, and as the manifest's `reference` mode runs it
        session = ort.InferenceSession(
            _one_matmul(node, inits, q.shape[0]).SerializeToString(),
            session_options(level, ORT_QDQ["reference"]),
            providers=["CPUExecutionProvider"],
        )
        (y,) = session.run(None, {"x": x})
        np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    # and it is INT4, not the float weights: the error against them is that of 4 bits
    original = _original(artifacts, "tiny-dense")[name]
    assert np.abs(w - original).max() > 1e-3


@torch.no_grad()
def _fake_quantized(preset: str, group: int) -> torch.nn.Module:
    """transformers' model with every selected weight replaced by the numpy reference's dequantized one."""
    model = load_model(preset).model
    select = load_recipe("int4-rtn").select
    for name, param in model.named_parameters():
        if select.selects(name):  # transformers stores [out, in] and experts [E, rows, in]: input last
            q, scale = reference_int4(param.numpy(), group)
            param.copy_(torch.from_numpy(q * np.repeat(scale, group, axis=-1)))
    return model


@pytest.mark.parametrize("preset", PRESETS)
def test_int4_graph_equals_torch_fake_quant(preset, int4):
    """ONNX Runtime on the whole INT4 graph computes what transformers computes with the reference
    quantizer's weights (12 fresh random sequences; at most one may drift at a near-tied expert)."""
    ids = np.random.default_rng().integers(0, 151643, (12, 8))
    with torch.no_grad():
        want = _fake_quantized(preset, GROUP)(torch.from_numpy(ids)).logits.numpy()
        fp32 = load_model(preset).model(torch.from_numpy(ids)).logits.numpy()
    batch = left_padded_batch(ids.tolist(), 0)
    manifest = int4[preset].manifest
    runner = OrtRunner(int4[preset].directory / "model.onnx", session_config=manifest.ort_session_config)
    got = runner.forward(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(12))[0]
    matching = np.abs(got - want).max(axis=(1, 2)) <= 2e-3
    assert matching.sum() >= 11, np.abs(got - want).max(axis=(1, 2))
    assert np.abs(want - fp32).max() > 0.05  # the quantization is really there


@pytest.mark.slow
@pytest.mark.parametrize("preset", GATE_PRESETS)
def test_int4_rtn_meets_recipe_gates(preset, int4, artifacts, tmp_path):
    artifact = int4[preset]
    report = validate_artifact(
        artifact.directory,
        artifacts.loaded(preset),
        decode_steps=8,
        long_context_tokens=0,
        bisect=False,
        recipe_check=False,
        output=tmp_path / "v",
    )
    assert report.gates_source == f"recipe int4-rtn-g{GROUP} (random-weight stress gates)"
    assert report.passed, report.failures


def test_group_size_that_does_not_divide_is_refused(artifacts, tmp_path):
    """int4-rtn's 128 does not divide the tiny presets' widths: refused before any work, naming the recipe
    file, the field, the tensor and the sizes that would fit; the CLI exits 2 without a traceback."""
    with pytest.raises(BadInputError) as info:
        quantize_artifact(artifacts.export("tiny-dense"), "int4-rtn", tmp_path / "out")
    err = info.value
    assert err.field == "weights.group_size" and err.file.endswith("int4-rtn.toml")
    assert "does not divide the input dimension 64" in err.problem and "model.layers.0." in err.problem
    assert "--group-size" in err.fix and "64, 32, 16" in err.fix
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        main,
        ["quantize", str(artifacts.export("tiny-moe")), "--recipe", "int4-rtn", "-o", str(tmp_path / "q")],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "weights.group_size" in result.output and "divides 32" in result.output
    result = CliRunner().invoke(  # --group-size on a recipe without groups
        main,
        [
            "quantize",
            str(artifacts.export("tiny-moe")),
            "--recipe",
            "int8-wo",
            "--group-size",
            "32",
            "-o",
            "x",
        ],
    )
    assert result.exit_code == 2 and "--group-size" in result.output


def test_int4_needs_opset_21(tmp_path):
    from qwen3_compile.export.stage import ExportOptions, export_onnx

    old = export_onnx("tiny-dense", tmp_path / "e", ExportOptions(opset=20)).directory
    with pytest.raises(BadInputError) as info:
        quantize_artifact(old, with_group_size(load_recipe("int4-rtn"), GROUP), tmp_path / "out")
    assert info.value.field == "--opset" and "21" in info.value.fix


def _folded_logits(export_dir, transforms, batch, path) -> np.ndarray:
    """ORT logits of the export with `transforms` applied to its float initializers (nothing quantized)."""
    model = onnx.load(str(export_dir / "model.onnx"))
    for proto in model.graph.initializer:
        if proto.name in transforms:
            values = transforms[proto.name](numpy_helper.to_array(proto))
            proto.CopyFrom(numpy_helper.from_array(values, proto.name))
    onnx.save(model, str(path))
    runner = OrtRunner(path)
    cache = runner.empty_cache(len(batch.input_ids))
    return runner.forward(batch.input_ids, batch.attention_mask, batch.position_ids, cache)[0]


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe-outliers"])
def test_awq_folds_keep_the_float_function(preset, artifacts, tmp_path):
    """AWQ's scales and their folds (norms, v_proj rows for o_proj under GQA, up rows for down, per expert,
    the float router) applied to the float weights without quantizing: the same logits as the original."""
    from qwen3_compile.export.stage import export_onnx
    from qwen3_compile.models.config import Qwen3Arch
    from qwen3_compile.quantize.awq import AwqSearch
    from qwen3_compile.quantize.awq_fold import awq_transforms
    from qwen3_compile.quantize.calibrate import calibrate
    from qwen3_compile.quantize.calibration_data import load_calibration
    from qwen3_compile.tokenizer import load_tokenizer

    export = artifacts.export(preset) if preset in PRESETS else export_onnx(preset, tmp_path / "e").directory
    arch = Qwen3Arch.from_config_file(export / "config.json")
    texts = load_calibration(load_tokenizer(export), samples=4, max_tokens=48)
    weights = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(export / "model.onnx")).graph.initializer
    }
    search = AwqSearch(arch, grid=5, group=GROUP, max_tokens=512)
    calibrate(arch, weights.__getitem__, texts, on_layer=search)
    transforms = awq_transforms(arch, search.scales)
    assert max(float(np.abs(np.log(s)).max()) for s in search.scales.values()) > 0.1  # really scaled
    rng = np.random.default_rng()
    batch = left_padded_batch([rng.integers(0, 151643, 9).tolist(), rng.integers(0, 151643, 4).tolist()], 0)
    original = _folded_logits(export, {}, batch, tmp_path / "original.onnx")
    folded = _folded_logits(export, transforms, batch, tmp_path / "folded.onnx")
    real = batch.attention_mask.astype(bool)
    np.testing.assert_allclose(folded[real], original[real], atol=2e-4, rtol=1e-4)
    changed = weights["model.layers.0.self_attn.v_proj.weight.T"]
    assert not np.allclose(transforms["model.layers.0.self_attn.v_proj.weight.T"](changed), changed)


@pytest.mark.slow
def test_awq_beats_rtn_on_activation_outliers(tmp_path):
    """tiny-moe-outliers (three RMSNorm output channels 60x larger, readers' columns / 60: the same float
    function): round-to-nearest INT4 loses the small outlier columns in their groups; AWQ scales them back
    and its mean KL against fp32 is at most half of RTN's."""
    import json

    from qwen3_compile.export.stage import export_onnx

    exported = export_onnx("tiny-moe-outliers", tmp_path / "export").directory
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(t)
            for t in (
                "Why is the sky blue?",
                "Write a Python quicksort.",
                "Solve 3x + 5 = 20.",
                "用一句话介绍长城。",
            )
        )
    )
    loaded = load_model("tiny-moe-outliers")
    kl = {}
    for name in ("int4-rtn", "int4-awq"):
        result = quantize_artifact(
            exported, with_group_size(load_recipe(name), GROUP), tmp_path / name, samples=16
        )
        report = validate_artifact(
            result.directory,
            loaded,
            prompts=prompts,
            decode_steps=4,
            long_context_tokens=0,
            bisect=False,
            recipe_check=False,
        )
        kl[name] = report.summary("prefill").mean_kl
    assert kl["int4-awq"] <= kl["int4-rtn"] / 2, kl
    # the attention and MLP blocks read the outlier channels: there the search must cut RTN's block-output
    # error by more than half (the o_proj and expert down groups read no outlier and gain little)
    ratios = result.manifest.awq["mse_vs_rtn"]
    blocks = {k: v for k, v in ratios.items() if k.endswith((".attn", ".mlp"))}
    assert len(blocks) == 4 and max(blocks.values()) < 0.5, ratios


@pytest.mark.slow
def test_int4_awq_meets_recipe_gates(artifacts, tmp_path):
    result = quantize_artifact(
        artifacts.export("tiny-moe"),
        with_group_size(load_recipe("int4-awq"), GROUP),
        tmp_path / "q",
        samples=16,
    )
    assert (result.directory / "calibration.safetensors").is_file() and result.manifest.awq["grid"] == 20
    report = validate_artifact(
        result.directory, "tiny-moe", decode_steps=8, long_context_tokens=0, bisect=False, recipe_check=False
    )
    assert (
        report.gates_source == f"recipe int4-awq-g{GROUP} (random-weight stress gates)" and report.passed
    ), report.failures


def _int4_groups_numpy(w: np.ndarray, group: int) -> np.ndarray:
    """Symmetric INT4 per group along the last axis, dequantized (int4.py's convention, in numpy)."""
    g = w.reshape(*w.shape[:-1], -1, group)
    scale = np.abs(g).max(-1, keepdims=True) / 7
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(g / scale), -7, 7) * scale).reshape(w.shape)


def test_awq_clip_search_picks_the_least_output_error_per_group():
    """Against a numpy evaluation of every ratio: the chosen ratio per (output channel, group) has the least
    output error on the activations, never more than round-to-nearest's, and groups whose one large weight
    reads a near-silent input channel are clipped (its error costs little, the grid it frees a lot)."""
    from qwen3_compile.quantize.awq import clip_ratios, search_clip

    rng = np.random.default_rng()
    out, width, group, grid = 6, 64, 16, 8
    w = rng.standard_normal((out, width))
    w[:, ::group] *= 8  # one large weight per group: round to nearest wastes the grid on it
    x = rng.standard_normal((300, width))
    x[:, ::group] *= 0.01
    chosen = search_clip(torch.from_numpy(x), torch.from_numpy(w), group, grid)
    assert chosen.shape == (out, width // group)
    errors = np.stack(
        [
            sum(
                np.einsum("gk,rgk->rg", row.reshape(-1, group), (w - q_r).reshape(out, -1, group)) ** 2
                for row in x
            )
            for q_r in (
                _int4_groups_numpy(
                    np.clip(
                        w.reshape(out, -1, group),
                        -r * np.abs(w.reshape(out, -1, group)).max(-1, keepdims=True),
                        r * np.abs(w.reshape(out, -1, group)).max(-1, keepdims=True),
                    ).reshape(out, width),
                    group,
                )
                for r in clip_ratios(grid)
            )
        ]
    )
    best = np.array(clip_ratios(grid))[errors.argmin(0)]
    np.testing.assert_array_equal(chosen, best)
    picked = np.take_along_axis(errors, errors.argmin(0)[None], 0)[0]
    assert (picked <= errors[0] * (1 + 1e-12)).all() and (chosen < 1).mean() > 0.5


def test_awq_clip_transform_clamps_each_group_of_a_stored_weight():
    """The transform on a weight stored [in, out]: each (input group, output) clamped to ratio x its max |w|,
    so the quantizer's scale becomes ratio x max / 7."""
    from qwen3_compile.quantize.awq_fold import clip_groups
    from qwen3_compile.quantize.weights import quantize_groups

    rng = np.random.default_rng()
    stored = rng.standard_normal((64, 5)).astype(np.float32)  # [in, out]
    ratios = rng.choice([1.0, 0.8, 0.55], size=(5, 4))  # [out, groups]
    clipped = clip_groups(stored, ratios)
    by_group = stored.reshape(4, 16, 5)
    limit = np.abs(by_group).max(1) * ratios.T  # [groups, out]
    np.testing.assert_allclose(clipped.reshape(4, 16, 5), np.clip(by_group, -limit[:, None], limit[:, None]))
    _, scale = quantize_groups(clipped, 16)
    np.testing.assert_allclose(scale, limit / 7, rtol=1e-6)


def test_awq_clip_transform_clamps_each_group_of_stacked_experts():
    """Stacked experts [E, rows, in] with ratios [E, rows, groups]: each (expert, row, input group) clamped
    to ratio x its max |w|, so the quantizer's per-group scale becomes ratio x max / 7."""
    from qwen3_compile.quantize.awq_fold import clip_groups
    from qwen3_compile.quantize.weights import quantize_groups

    rng = np.random.default_rng()
    stored = rng.standard_normal((3, 5, 64)).astype(np.float32)
    ratios = rng.choice([1.0, 0.8, 0.55], size=(3, 5, 4))
    clipped = clip_groups(stored, ratios)
    by_group = stored.reshape(3, 5, 4, 16)
    limit = np.abs(by_group).max(-1) * ratios
    np.testing.assert_allclose(
        clipped.reshape(3, 5, 4, 16), np.clip(by_group, -limit[..., None], limit[..., None])
    )
    _, scale = quantize_groups(clipped, 16)
    np.testing.assert_allclose(scale, limit / 7, rtol=1e-6)
