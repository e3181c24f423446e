"""Published quantized checkpoints (FP8 block, AWQ GEMM, GPTQ 4/8-bit, desc_act) imported without
re-quantizing: the loader's dequantization equals an independent numpy one exactly, the exported graph
(the checkpoint's own values behind DequantizeLinear) matches the dequantized PyTorch model on fresh
random tokens, and damaged checkpoints are refused with exit 2 naming the tensor or field."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qwen3_compile.backends.base import generate, left_padded_batch
from qwen3_compile.backends.registry import open_runner
from qwen3_compile.backends.torch_reference import TorchRunner
from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError
from qwen3_compile.export.stage import export_onnx
from qwen3_compile.models.checkpoint import load_state_dict, open_checkpoint
from qwen3_compile.models.loading import load_model
from qwen3_compile.quantize.weights import dequantized_source
from qwen3_compile.storage.manifest import read_manifest

from .quantized_checkpoints import save_quantized_checkpoint

FORMATS = {
    "fp8": ("fp8", {}),
    "fp8-block32": ("fp8", {"block": (32, 32)}),
    "awq": ("awq", {}),
    "gptq4": ("gptq", {}),
    "gptq8": ("gptq", {"bits": 8}),
    "gptq4-desc-act": ("gptq", {"desc_act": True}),
    "gptq4-asym-v2": ("gptq", {"sym": False, "v2": True}),
}
# what the graph holds for each: DequantizeLinear's value type and whether it has a zero point
GRAPH_FORM = {
    "fp8": (onnx.TensorProto.FLOAT8E4M3FN, False),
    "fp8-block32": (onnx.TensorProto.FLOAT8E4M3FN, False),
    "awq": (onnx.TensorProto.UINT4, True),
    "gptq4": (onnx.TensorProto.INT4, False),
    "gptq8": (onnx.TensorProto.INT8, False),
    "gptq4-desc-act": (onnx.TensorProto.INT4, False),
    "gptq4-asym-v2": (onnx.TensorProto.UINT4, True),
}


@pytest.mark.parametrize("arch", ["dense", "moe"])
@pytest.mark.parametrize("name", FORMATS)
def test_dequantization_is_exact(tmp_path, name, arch):
    kind, opts = FORMATS[name]
    expected = save_quantized_checkpoint(tmp_path / "ckpt", arch, kind, **opts)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert set(ckpt.quantization.linears) == set(expected)
    state = load_state_dict(ckpt)
    for weight, want in expected.items():
        np.testing.assert_array_equal(ckpt.quantization.read(weight).dequantize(), want, err_msg=weight)
    if arch == "moe":  # fused as the reference model wants them, expert e's gate rows first
        np.testing.assert_array_equal(
            state["model.layers.1.mlp.experts.gate_up_proj"][2, :32].numpy(),
            expected["model.layers.1.mlp.experts.2.gate_proj.weight"],
        )
    else:
        np.testing.assert_array_equal(
            state["model.layers.0.mlp.down_proj.weight"].numpy(),
            expected["model.layers.0.mlp.down_proj.weight"],
        )


@pytest.mark.parametrize("arch", ["dense", "moe"])
@pytest.mark.parametrize("name", FORMATS)
def test_exported_graph_matches_the_dequantized_model(tmp_path, name, arch):
    if arch == "moe" and name == "gptq4-desc-act":
        pytest.skip("desc_act experts are refused (test_desc_act_experts_are_refused)")
    kind, opts = FORMATS[name]
    save_quantized_checkpoint(tmp_path / "ckpt", arch, kind, **opts)
    artifact = export_onnx(tmp_path / "ckpt", tmp_path / "onnx")
    manifest = read_manifest(tmp_path / "onnx")
    assert manifest.imported["method"] == kind and manifest.imported["quantized_linears"] > 0
    assert manifest.ort_session_config == {"session.disable_quant_qdq": "1"}
    graph = onnx.load(tmp_path / "onnx" / "model.onnx")
    values = {t.name: t for t in graph.graph.initializer}
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == artifact.op_histogram["DequantizeLinear"] == (14 if arch == "dense" else 12)
    dtype, zero_point = GRAPH_FORM[name]
    for node in dq:
        assert values[node.input[0]].data_type == dtype
        assert (len(node.input) == 3) == zero_point
        assert not any(v.name == node.input[0].removesuffix(".q") for v in graph.graph.initializer)
        weight = node.input[0].removesuffix(".T.q").removesuffix(".q")
        if name != "gptq4-desc-act":  # the quantize stage's naming: later stages find the weight behind it
            assert dequantized_source(node.output[0]) == weight
    assert ("Gather" in {n.op_type for n in graph.graph.node if n.name.endswith("/Gather")}) == (
        name == "gptq4-desc-act"
    )
    candidate = open_runner(tmp_path / "onnx", manifest, "ort")
    reference = TorchRunner(load_model(tmp_path / "ckpt"))
    rng = np.random.default_rng()  # fresh tokens each run
    batch = left_padded_batch([list(rng.integers(3, 512, 11)), list(rng.integers(3, 512, 6))], 0)
    ref = generate(reference, batch, 4)
    got = generate(candidate, batch, 4, forced=ref.tokens)
    real = batch.attention_mask.astype(bool)  # padded positions compute nothing anyone reads
    assert np.abs(ref.prefill_logits - got.prefill_logits)[real].max() < 1e-4
    for a, b in zip(ref.step_logits, got.step_logits, strict=True):
        assert np.abs(a - b).max() < 1e-4


def test_desc_act_experts_are_refused(tmp_path):
    save_quantized_checkpoint(tmp_path / "ckpt", "moe", "gptq", desc_act=True)
    with pytest.raises(BadInputError, match="desc_act experts") as err:
        export_onnx(tmp_path / "ckpt", tmp_path / "onnx")
    assert err.value.field.endswith(".qweight")


def test_quantize_refuses_an_imported_export(tmp_path):
    save_quantized_checkpoint(tmp_path / "ckpt", "dense", "awq")
    export_onnx(tmp_path / "ckpt", tmp_path / "onnx")
    result = CliRunner().invoke(
        main, ["quantize", str(tmp_path / "onnx"), "--recipe", "int8-wo", "-o", str(tmp_path / "q")]
    )
    assert result.exit_code == 2, result.output
    assert "imported" in result.output and "round them twice" in result.output


@pytest.mark.parametrize("fmt", ["awq", "gptq8", "fp8", "fp8-scales-fp16-exact"])
def test_scales_exact_in_fp16_predicts_the_fp16_export(tmp_path, fmt):
    """`compile --target` exports fp16 where `scales_exact_in_fp16` says so: it must agree with the export's
    own per-weight check (F16 scales without reading them; FP8's fp32 scales read, whether rounded to fp16
    numbers or not)."""
    from safetensors.torch import load_file, save_file

    from qwen3_compile.export.stage import ExportOptions
    from qwen3_compile.models.loading import resolve_model

    kind, opts = FORMATS[fmt.removesuffix("-scales-fp16-exact")]
    save_quantized_checkpoint(tmp_path / "ckpt", "dense", kind, **opts)
    if fmt.endswith("fp16-exact"):  # the same checkpoint with every fp32 scale an fp16 number
        path = tmp_path / "ckpt" / "model.safetensors"
        tensors = load_file(str(path))
        for name in [n for n in tensors if n.endswith("weight_scale_inv")]:
            tensors[name] = tensors[name].half().float()
        save_file(tensors, str(path))
    exact = resolve_model(tmp_path / "ckpt").quantization.scales_exact_in_fp16()
    assert exact == (fmt != "fp8")
    if exact:
        export_onnx(tmp_path / "ckpt", tmp_path / "onnx", ExportOptions(dtype="fp16"))
    else:
        with pytest.raises(BadInputError, match="not exact in float16"):
            export_onnx(tmp_path / "ckpt", tmp_path / "onnx", ExportOptions(dtype="fp16"))


def test_inspect_reports_the_quantization(tmp_path):
    save_quantized_checkpoint(tmp_path / "ckpt", "moe", "gptq", bits=8, desc_act=True)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "ckpt"), "--json"])
    assert result.exit_code == 0, result.output
    q = json.loads(result.output)["checkpoint"]["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["desc_act"]) == ("gptq", 8, 32, True)
    assert "model.layers.N.mlp.experts.N.down_proj" in q["quantized_modules"]
    assert q["stored_bytes"] < q["bf16_bytes"]


@pytest.mark.parametrize(("fmt", "precision"), [("awq", "int4"), ("gptq8", "int8"), ("fp8", "fp8")])
def test_inspect_fits_targets_at_the_stored_precision_and_size(tmp_path, fmt, precision):
    """An imported checkpoint's precision is fixed: the weight size and the target fit are for that precision
    only, at its stored bytes (quantized tensors as stored, every other weight in fp16, counted here from the
    safetensors file itself); a target without that precision is n/a (FP8 on Orin)."""
    from safetensors.torch import load_file

    from qwen3_compile.sizing import GB, KV_COPIES, activation_bytes, kv_bytes_per_token
    from qwen3_compile.targets import get_target

    kind, opts = FORMATS[fmt]
    save_quantized_checkpoint(tmp_path / "ckpt", "dense", kind, **opts)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "ckpt"), "--json", "--context", "256"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    stored_roles = ("qweight", "qzeros", "scales", "g_idx", "weight_scale_inv")
    quantized = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(stored_roles[:1] + stored_roles[4:])}
    want = 0
    for name, t in tensors.items():
        module = name.rsplit(".", 1)[0]
        want += t.numel() * (t.element_size() if module in quantized else 2)
    assert list(report["weight_gb"]) == [precision]
    assert report["weight_gb"][precision] * GB == pytest.approx(want, rel=1e-9)
    arch = load_model(tmp_path / "ckpt").arch
    for row in report["targets"]:
        target = get_target(row["target"])
        assert list(row["headroom_gb"]) == [precision]
        if precision not in target.precisions:
            assert row["headroom_gb"][precision] is None and row["best_precision"] is None
            continue
        plan = want + KV_COPIES * 256 * kv_bytes_per_token(arch) + activation_bytes(arch, 256, 256)
        assert row["headroom_gb"][precision] == pytest.approx(target.usable_gb - plan / GB, abs=1e-9)


# ---- hostile variants: each damages one field or tensor of a valid checkpoint -------------------------


def _config(**changes):
    def damage(ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["quantization_config"].update(changes)
        (ckpt / "config.json").write_text(json.dumps(cfg))

    return damage


def _tensor(name, edit):
    def damage(ckpt):
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(ckpt / "model.safetensors")
        result = edit(tensors[name].clone(), torch)
        if result is None:
            del tensors[name]
        else:
            tensors[name] = result
        save_file(tensors, ckpt / "model.safetensors")

    return damage


P = "model.layers.0.self_attn.q_proj"
HOSTILE = [
    ("fp8-e5m2", "fp8", {}, _config(fmt="e5m2"), "quantization_config.fmt"),
    ("fp8-static", "fp8", {}, _config(activation_scheme="static"), "activation_scheme"),
    ("fp8-block-bad", "fp8", {}, _config(weight_block_size=[128]), "weight_block_size"),
    ("fp8-block-string", "fp8", {}, _config(weight_block_size="128"), "weight_block_size"),
    ("fp8-no-scale", "fp8", {}, _tensor(f"{P}.weight_scale_inv", lambda t, torch: None), "weight_scale_inv"),
    (
        "fp8-scale-shape",
        "fp8",
        {},
        _tensor(f"{P}.weight_scale_inv", lambda t, torch: t.repeat(2, 1)),
        "weight_scale_inv",
    ),
    (
        "fp8-scale-nan",
        "fp8",
        {},
        _tensor(f"{P}.weight_scale_inv", lambda t, torch: t * float("nan")),
        "weight_scale_inv",
    ),
    (
        "fp8-scale-inf",
        "fp8",
        {},
        _tensor(f"{P}.weight_scale_inv", lambda t, torch: t / 0.0),
        "weight_scale_inv",
    ),
    ("fp8-weight-float", "fp8", {}, _tensor(f"{P}.weight", lambda t, torch: t.float()), f"{P}.weight"),
    (
        "fp8-weight-nan",
        "fp8",
        {},
        _tensor(
            f"{P}.weight", lambda t, torch: torch.full_like(t.float(), float("nan")).to(torch.float8_e4m3fn)
        ),
        f"{P}.weight",
    ),
    ("fp8-lm-head-listed", "fp8", {}, _config(modules_to_not_convert=["q_proj"]), "modules_to_not_convert"),
    ("awq-bits-8", "awq", {}, _config(bits=8), "quantization_config.bits"),
    ("awq-gemv", "awq", {}, _config(version="gemv"), "quantization_config.version"),
    ("awq-group-wrong", "awq", {}, _config(group_size=16), "qzeros"),
    ("awq-group-odd", "awq", {}, _config(group_size=48), "group_size"),
    ("awq-no-zero-point", "awq", {}, _config(zero_point=False), "zero_point"),
    ("awq-qweight-float", "awq", {}, _tensor(f"{P}.qweight", lambda t, torch: t.float()), f"{P}.qweight"),
    ("awq-missing-zeros", "awq", {}, _tensor(f"{P}.qzeros", lambda t, torch: None), f"{P}.qzeros"),
    ("awq-scale-negative", "awq", {}, _tensor(f"{P}.scales", lambda t, torch: -t), f"{P}.scales"),
    ("awq-scale-nan", "awq", {}, _tensor(f"{P}.scales", lambda t, torch: t * float("nan")), f"{P}.scales"),
    ("gptq-bits-3", "gptq", {}, _config(bits=3), "quantization_config.bits"),
    ("gptq-bits-string", "gptq", {}, _config(bits="4"), "quantization_config.bits"),
    ("gptq-format-unknown", "gptq", {}, _config(checkpoint_format="marlin"), "checkpoint_format"),
    ("gptq-lm-head", "gptq", {}, _config(lm_head=True), "quantization_config.lm_head"),
    ("gptq-bits-8-on-4-bit-tensors", "gptq", {}, _config(bits=8), f"{P}.qweight"),
    ("gptq-g-idx-out-of-range", "gptq", {}, _tensor(f"{P}.g_idx", lambda t, torch: t + 100), f"{P}.g_idx"),
    ("gptq-g-idx-negative", "gptq", {}, _tensor(f"{P}.g_idx", lambda t, torch: t - 1), f"{P}.g_idx"),
    (
        "gptq-g-idx-shuffled-no-desc-act",
        "gptq",
        {},
        _tensor(f"{P}.g_idx", lambda t, torch: t.flip(0)),
        f"{P}.g_idx",
    ),
    (
        "gptq-g-idx-missing-desc-act",
        "gptq",
        {"desc_act": True},
        _tensor(f"{P}.g_idx", lambda t, torch: None),
        f"{P}.g_idx",
    ),
    ("gptq-scales-int", "gptq", {}, _tensor(f"{P}.scales", lambda t, torch: t.int()), f"{P}.scales"),
    ("gptq-scale-zero", "gptq", {}, _tensor(f"{P}.scales", lambda t, torch: t * 0), f"{P}.scales"),
    (
        "gptq-float-and-quantized",
        "gptq",
        {},
        lambda ckpt: _add_float_weight(ckpt, f"{P}.weight"),
        f"{P}.weight",
    ),
]


def _add_float_weight(ckpt, name):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors[name] = torch.zeros(128, 64)
    save_file(tensors, ckpt / "model.safetensors")


@pytest.mark.parametrize("command", ["inspect", "export"])
@pytest.mark.parametrize("case, kind, opts, damage, field", [pytest.param(*c, id=c[0]) for c in HOSTILE])
def test_hostile_quantized_checkpoint_refused(tmp_path, command, case, kind, opts, damage, field):
    ckpt = tmp_path / "ckpt"
    save_quantized_checkpoint(ckpt, "dense", kind, **opts)
    damage(ckpt)
    args = [command, str(ckpt)] + (["-o", str(tmp_path / "out")] if command == "export" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Fix:" in result.output, result.output
    assert field in result.output, result.output


def test_gptq_v1_zero_point_16_has_no_uint4_form(tmp_path):
    """AutoGPTQ's v1 format stores zero - 1: a stored 15 means 16, which no uint4 zero point holds. The
    checkpoint still dequantizes (the reference); its export is refused with the reason."""
    import torch

    ckpt = tmp_path / "ckpt"
    save_quantized_checkpoint(ckpt, "dense", "gptq", sym=False)
    _tensor(f"{P}.qzeros", lambda t, torch: torch.full_like(t, -1))(ckpt)  # every stored zero 15 -> 16
    loaded = open_checkpoint(ckpt)
    w = loaded.quantization.read(f"{P}.weight")
    assert int(w.zero.max()) == 16 and torch.isfinite(torch.from_numpy(w.dequantize())).all()
    with pytest.raises(BadInputError, match="zero point of 16") as err:
        export_onnx(ckpt, tmp_path / "onnx")
    assert err.value.field == f"{P}.qweight"


@pytest.mark.parametrize("kind", ["awq", pytest.param("fp8", marks=pytest.mark.slow)])
def test_validate_against_the_checkpoints_own_dequantized_weights(tmp_path, kind):
    """`export CKPT` then `validate --reference CKPT`: the reference is the checkpoint dequantized, so the
    fp32 graph is held to the fp32 export gates (float rounding), in both reasoning modes."""
    ckpt, onnx_dir = tmp_path / "ckpt", tmp_path / "onnx"
    save_quantized_checkpoint(ckpt, "tiny-dense", kind)
    prompts = tmp_path / "few.jsonl"
    prompts.write_text('"Explain rotary embeddings."\n{"prompt": "def f(x): return"}\n')
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(ckpt), "-o", str(onnx_dir)])
    assert result.exit_code == 0, result.output
    args = ["validate", str(onnx_dir), "--reference", str(ckpt), "--prompts", str(prompts)]
    result = runner.invoke(main, [*args, "--decode-steps", "4", "--long-context-tokens", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((onnx_dir / "validation" / "report.json").read_text())
    assert report["passed"] and report["modes"] == ["non-thinking", "thinking"]
    assert report["gates_source"] == "defaults for fp32" and report["reference"] == str(ckpt)
    assert report["summary"]["prefill"]["max_abs"] < 1e-3
    assert report["backend_settings"]["optimization"] == ("basic" if kind == "fp8" else "all")
