"""`build` of imported quantized checkpoints (models/quantized): TensorRT takes their weights as they are or
the build refuses before any work. Symmetric GPTQ (desc_act false and true) and FP8 block-scaled imports
build TensorRT-RTX plans, and so do asymmetric ones (AWQ, GPTQ with zero points), rewritten exactly into
signed weights plus a block-sum term (lower/trt_zero_points.py); asymmetric MoE experts and FP8 on a target
without FP8 exit 2 naming the manifest field."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen3_compile.cli import main

from ..models.quantized_checkpoints import save_quantized_checkpoint

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def _imported(tmp_path: Path, kind: str, arch: str = "tiny-dense", **opts) -> Path:
    checkpoint, out = tmp_path / f"{kind}-checkpoint", tmp_path / f"{kind}-onnx"
    save_quantized_checkpoint(checkpoint, arch, kind, **opts)
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _build(artifact: Path, target: str, out: Path):
    result = CliRunner().invoke(main, ["build", str(artifact), "--target", target, "-o", str(out), "--json"])
    text = result.stdout
    return result.exit_code, json.JSONDecoder().raw_decode(text[text.index("{") :])[0]


@pytest.mark.parametrize(
    ("kind", "target", "field"),
    [("awq", "rtx-ada", "imported.sym"), ("fp8", "jetson-orin-nano", "imported.method")],
)
def test_build_refuses_what_tensorrt_cannot_take_before_any_work(tmp_path, kind, target, field):
    # AWQ: MoE experts with zero points (TensorRT's expert paths take symmetric weights only)
    artifact = _imported(tmp_path, kind, arch="tiny-moe" if kind == "awq" else "tiny-dense")
    code, error = _build(artifact, target, tmp_path / "plan")
    assert code == 2 and error["field"] == field and error["file"].endswith("manifest.json"), error
    assert "lower --for ort" in error["fix"] or "quantize" in error["fix"]
    assert not (tmp_path / "plan").exists()


@pytest.mark.skipif(not HAS_RTX, reason="needs tensorrt_rtx: pip install '.[rtx]'")
@pytest.mark.parametrize(
    ("kind", "opts"),
    [
        pytest.param("gptq", {}, marks=pytest.mark.slow),
        ("gptq", {"desc_act": True}),
        ("fp8", {}),
        ("awq", {}),
        pytest.param("gptq", {"sym": False, "desc_act": True}, marks=pytest.mark.slow),
        pytest.param("gptq", {"sym": False, "bits": 8}, marks=pytest.mark.slow),
    ],
)
def test_imports_build_tensorrt_rtx_plans(tmp_path, kind, opts):
    artifact = _imported(tmp_path, kind, **opts)
    code, built = _build(artifact, "rtx-ada", tmp_path / "plan")
    assert code == 0, built
    assert Path(built["plan"]).stat().st_size > 0 and built["tensorrt"]["flavour"] == "tensorrt-rtx"
    manifest = json.loads((Path(built["directory"]) / "manifest.json").read_text())
    rewritten = manifest["lowering"]["applied"].get("zero_point_weights_to_symmetric", 0)
    assert rewritten == (14 if kind == "awq" or not opts.get("sym", True) else 0)
