"""Refused before any work, with the numbers: FP8 on Orin, a model too large for the target, an artifact
without a passing validation report. The artifacts here are manifests only: the checks read nothing else."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qwen3_compile.bundle import bundle_artifact
from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError, CheckFailedError
from qwen3_compile.models.presets import get_preset
from qwen3_compile.sizing import GB, kv_bytes_per_token, weight_bytes

from .fake_artifacts import write_artifact_manifest


def test_fp8_on_orin_is_refused_naming_the_recipes_that_fit(tmp_path):
    artifact = write_artifact_manifest(tmp_path / "fp8", get_preset("tiny-moe").arch, "fp8")
    out = tmp_path / "b.tar.gz"
    result = CliRunner().invoke(
        main, ["bundle", str(artifact), "--target", "jetson-agx-orin", "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "recipe 'fp8' cannot run on jetson-agx-orin (SM 8.7)" in result.output
    assert "fp8 is not among its precisions (fp16, int8, int4)" in result.output
    assert "int8-sq" in result.output and "int8-wo" in result.output
    assert not out.exists()


def test_fp8_on_thor_passes_the_precision_check(tmp_path):
    """The same artifact for Thor gets past precision and memory: what stops it is the missing report."""
    artifact = write_artifact_manifest(tmp_path / "fp8", get_preset("tiny-moe").arch, "fp8")
    with pytest.raises(BadInputError, match="no validation report"):
        bundle_artifact(artifact, "jetson-thor", tmp_path / "b.tar.gz")


def test_30b_a3b_int8_on_orin_nano_is_refused_with_its_size_and_what_fits(tmp_path):
    arch = get_preset("qwen3-30b-a3b").arch
    artifact = write_artifact_manifest(tmp_path / "30b", arch, "int8-wo")
    out = tmp_path / "b.tar.gz"
    result = CliRunner().invoke(
        main, ["bundle", str(artifact), "--target", "jetson-orin-nano", "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    weights = weight_bytes(arch, "int8")  # from the architecture alone (sizing.py; 31.3 GB, see README)
    kv = 2 * 4096 * kv_bytes_per_token(arch, "fp16")  # past + present copies
    assert round(weights / GB, 1) == 31.3
    assert (
        f"weights {weights / GB:.1f} GB + KV cache (past + present) {kv / GB:.2f} GB at 4096 tokens" in text
    )
    need = float(text.split("it needs ")[1].split(" GB")[0])
    assert need >= round((weights + kv) / GB, 1)
    assert "against 6.0 GB usable" in text and f"{need - 6.0:.1f} GB short" in text
    assert "int4 would need" in text  # what the other precision of the target would need (also too much)
    # what fits instead: AGX Orin (58 GB usable) in int4/int8, Thor in any precision; nothing on the Nano
    fixes = text.split("Fix:")[1]
    assert (
        "jetson-agx-orin (58 GB usable): int4-awq (20.0 GB), int4-rtn (20.0 GB), int8-sq" in fixes
        and "jetson-thor" in fixes
    )
    assert (
        "jetson-orin-nano" not in fixes
        and "h100" not in fixes
        and "jetson-agx-orin (58 GB usable): fp16" not in fixes
    )
    assert not out.exists()


def test_a_model_that_fits_in_int8_but_not_fp16_names_the_recipe(tmp_path):
    arch = get_preset("qwen3-30b-a3b").arch  # 61 GB in fp16: not on AGX Orin's 58 GB
    artifact = write_artifact_manifest(tmp_path / "30b-fp16", arch, None, dtype="fp16")
    with pytest.raises(BadInputError) as err:
        bundle_artifact(artifact, "jetson-agx-orin", tmp_path / "b.tar.gz")
    assert f"weights {weight_bytes(arch, 'fp16') / GB:.1f} GB" in err.value.problem
    assert (
        "int8 would need" in err.value.problem
        and "jetson-agx-orin (58 GB usable): int4-awq (20.0 GB), int4-rtn (20.0 GB), int8-sq" in err.value.fix
    )


def test_failed_validation_is_refused(validated_int8_sq, tmp_path):
    import shutil

    artifact = tmp_path / "copy"
    shutil.copytree(validated_int8_sq, artifact)
    report = json.loads((artifact / "validation" / "report.json").read_text())
    report |= {"passed": False, "failures": ["top-1 agreement 0.5 < 0.85"]}
    (artifact / "validation" / "report.json").write_text(json.dumps(report))
    with pytest.raises(CheckFailedError, match="top-1 agreement 0.5 < 0.85"):
        bundle_artifact(artifact, "jetson-agx-orin", tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "b.tar.gz"
    out.write_bytes(b"old")
    with pytest.raises(BadInputError, match="--force"):
        bundle_artifact(tmp_path / "artifact", "jetson-agx-orin", out)
    assert out.read_bytes() == b"old"
