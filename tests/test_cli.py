"""The command line as users run it: exit codes, --json, messages without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen3_compile.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_inspect_default_preset():
    result = run("inspect")
    assert result.exit_code == 0, result.output
    assert "tiny-moe" in result.output and "jetson-orin-nano" in result.output


def test_inspect_json_for_machines():
    result = run("inspect", "qwen3-30b-a3b", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["parameters"]["total"] == pytest.approx(30.5e9, rel=0.01)
    assert data["architecture"]["num_experts"] == 128
    assert {t["target"] for t in data["targets"]} >= {"jetson-orin-nano", "jetson-thor", "h200"}


def test_inspect_checkpoint_json(saved_checkpoints):
    result = run("inspect", str(saved_checkpoints["tiny-moe-sharded"]), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["checkpoint"]["files"] > 1 and data["checkpoint"]["nonfinite_tensors"] == []
    assert data["checkpoint"]["expert_layout"] == "per_expert"


def test_inspect_layers_option():
    data = json.loads(run("inspect", "qwen3-30b-a3b", "--layers", "2", "--json").output)
    assert data["architecture"]["num_layers"] == 2 and data["published_parameters_b"] is None


def test_list_presets():
    result = run("inspect", "--list", "--json")
    assert "qwen3-235b-a22b-thinking-2507" in json.loads(result.output)


@pytest.mark.parametrize("arg", ["tiny-mo", "./no/such/dir"])
def test_bad_model_argument_exit_2_without_traceback(arg):
    result = run("inspect", arg)
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "Fix:" in result.output


def test_bad_checkpoint_exit_2_and_debug_traceback(checkpoint_copy):
    ckpt = checkpoint_copy("tiny-dense")
    (ckpt / "config.json").write_text("[]")
    plain = subprocess.run(
        [sys.executable, "-m", "qwen3_compile.cli", "inspect", str(ckpt)], capture_output=True, text=True
    )
    assert plain.returncode == 2
    assert "config.json" in plain.stderr and "Traceback" not in plain.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "qwen3_compile.cli", "inspect", str(ckpt), "--debug"],
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_nonfinite_checkpoint_inspect(checkpoint_copy):
    from safetensors.torch import load_file, save_file

    ckpt = checkpoint_copy("tiny-dense")
    state = load_file(ckpt / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")
    save_file(state, ckpt / "model.safetensors")
    refused = run("inspect", str(ckpt))
    assert refused.exit_code == 2 and "model.norm.weight" in refused.output
    allowed = run("inspect", str(ckpt), "--allow-nonfinite", "--json")
    assert allowed.exit_code == 0
    assert json.loads(allowed.output)["checkpoint"]["nonfinite_tensors"] == ["model.norm.weight"]
    assert run("inspect", str(ckpt), "--quick").exit_code == 0


def test_help_is_fast_and_lazy():
    heavy = "('torch', 'onnx', 'transformers')"
    code = f"import sys, qwen3_compile.cli; print(any(m in sys.modules for m in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_export_then_lower_commands(tmp_path):
    out = tmp_path / "exp"
    result = run("export", "tiny-moe", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["op_histogram"]["qwen3_compile::ExpertDispatch"] == 2
    again = run("export", "tiny-moe", "-o", str(out))
    assert again.exit_code == 2 and "--force" in again.output
    lowered = run("lower", str(out), "--for", "ort", "-o", str(tmp_path / "ort"), "--json")
    assert lowered.exit_code == 0, lowered.output
    data = json.loads(lowered.output)
    assert data["op_histogram"]["com.microsoft::MoE"] == 2 and data["applied"]
    assert json.loads((tmp_path / "ort" / "manifest.json").read_text())["stage"] == "lower"
    into_input = run("lower", str(out), "--for", "ort", "-o", str(out), "--force")
    assert into_input.exit_code == 2 and "input" in into_input.output
    assert (out / "model.onnx").is_file()  # the input survived


def test_removed_target_flags_name_the_lower_command(tmp_path):
    """`export --target ort` and `quantize --target ort` lowered before `lower` existed: exit 2 naming it."""
    export = run("export", "tiny-moe", "-o", str(tmp_path / "x"), "--target", "ort")
    assert export.exit_code == 2 and "qwen3-compile lower" in export.output
    assert not (tmp_path / "x").exists()
    quantize = run(
        "quantize", str(tmp_path), "--recipe", "int8-wo", "-o", str(tmp_path / "q"), "--target", "ort"
    )
    assert quantize.exit_code == 2 and "lower ARTIFACT --for ort" in quantize.output
    unknown = run("build", str(tmp_path), "--target", "jetson-nano-2", "-o", str(tmp_path / "e"))
    assert unknown.exit_code == 2 and "jetson-orin-nano" in unknown.output  # the choices are listed
    tensorrt_needs_device = run("lower", str(tmp_path), "--for", "tensorrt", "-o", str(tmp_path / "t"))
    assert tensorrt_needs_device.exit_code == 2 and "--target" in tensorrt_needs_device.output


@pytest.mark.slow  # the whole pipeline, about a minute; CI also runs it as the README's first command
def test_compile_main_job(tmp_path):
    result = run(
        "compile", "-o", str(tmp_path), "--decode-steps", "4", "--long-context-tokens", "300", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] and set(data["parity"]) == {"canonical", "ort"}
    assert (tmp_path / "tiny-moe" / "onnx-ort" / "model.onnx").exists()
    assert data["validation"]["passed"] and (tmp_path / "tiny-moe" / "validation" / "report.json").exists()
    assert json.loads((tmp_path / "tiny-moe" / "compile.json").read_text())["passed"]
    quantized = data["quantized"]
    assert quantized["recipe"] == "int8-sq" and quantized["validation"]["passed"]
    assert quantized["weight_ratio_vs_fp16"] <= 0.55 and quantized["calibration"]["experts_reached"] == [
        16,
        16,
    ]
    assert "engine" in data and ("skipped" in data["engine"] or Path(data["engine"]["path"]).is_file())


@pytest.mark.slow  # the whole pipeline on a published AWQ checkpoint (the tests' own packer), about a minute
def test_compile_a_published_awq_checkpoint(tmp_path):
    """`compile CKPT` on an AWQ checkpoint: exported with its own weights, both graphs at the fp32 parity
    gates against its own dequantization (the canonical one run as its manifest says: ONNX Runtime's
    DequantizeLinear fusion would quantize the activations), validated, never quantized again; with
    TensorRT-RTX installed its plan builds (the zero points rewritten)."""
    from .models.quantized_checkpoints import save_quantized_checkpoint

    save_quantized_checkpoint(tmp_path / "awq", "tiny-dense", "awq")
    out = str(tmp_path / "out")
    result = run("compile", str(tmp_path / "awq"), "-o", out, "--decode-steps", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] and data["quantized"] is None
    assert all(p["passed"] and p["prefill_max_abs"] < 1e-4 for p in data["parity"].values())
    assert data["artifacts"]["ort"]["lowering"]["applied"]["int4_matmul_to_matmul_nbits"] == 14
    assert "skipped" in data["engine"] or Path(data["engine"]["path"]).is_file()
