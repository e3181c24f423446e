"""`compile MODEL --target DEVICE`: the smallest recipe that runs on the device and passes its gates, end to
end on the trained-dense preset (real quantization, validation with perplexity, lowering and bundle)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from qwen3_compile.cli import main

# few decode steps and perplexity windows: the search, not the statistics, is under test here
FAST = ["--decode-steps", "4", "--ppl-windows", "2"]


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def orin_nano_run(artifacts):
    """One search on trained-dense for jetson-orin-nano over int8-wo, fp16 and fp8 (--json), once per run
    (`Artifacts.once`: parallel workers share it) -> (the CLI's exit code, output, stdout; the run folder).
    What the CLI printed is kept beside the run folder as JSON for the other workers."""
    root = artifacts.root / "compile-target"
    printed = root.with_name("compile-target.cli.json")

    def make() -> None:
        root.mkdir()
        result = _invoke(
            ["compile", "trained-dense", "--target", "jetson-orin-nano", "--recipes", "fp16,fp8,int8-wo"]
            + ["-o", root, "--json", *FAST]
        )
        fields = {"exit_code": result.exit_code, "output": result.output, "stdout": result.stdout}
        printed.write_text(json.dumps(fields))

    def load(_: object) -> SimpleNamespace:
        return SimpleNamespace(**json.loads(printed.read_text()))

    run = artifacts.once(("compile-target", "orin-nano"), root, make, load, sealed=False)
    return run, root / "trained-dense"


def test_keeps_the_smallest_passing_recipe(orin_nano_run):
    result, run_dir = orin_nano_run
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    by_recipe = {a["recipe"]: a for a in data["attempts"]}
    # size order: int8-wo's weights are smaller than fp16's, and it is tried first
    assert by_recipe["int8-wo"]["weight_bytes"] < by_recipe["fp16"]["weight_bytes"]
    tried = [a["recipe"] for a in data["attempts"] if a["decision"] in ("kept", "rejected")]
    assert tried[0] == "int8-wo"
    kept = [a for a in data["attempts"] if a["decision"] == "kept"]
    assert len(kept) == 1 and data["kept"]["recipe"] == kept[0]["applied"]
    # the first passing one is kept and nothing after it is tried
    order = [a["recipe"] for a in data["attempts"] if a["decision"] != "skipped"]
    after = order[order.index(kept[0]["recipe"]) + 1 :]
    assert all(by_recipe[r]["decision"] == "not tried" for r in after)
    assert by_recipe["fp16"]["decision"] in ("not tried", "rejected", "kept")
    # the kept folder is complete: its manifest names the recipe, its validation passed with perplexity
    artifact = run_dir / kept[0]["applied"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == kept[0]["applied"]
    report = json.loads((artifact / "validation" / "report.json").read_text())
    assert report["passed"] and report["perplexity"]["windows"] == 2
    assert set(report["modes"]) == {"thinking", "non-thinking"}
    gates = kept[0]["gates"]
    assert gates["mean_kl"] <= gates["max_mean_kl"] and gates["top1"] >= gates["min_top1"]
    assert gates["ppl_increase"] is not None
    # rejected attempts keep only their reports; no staging folder is left
    for attempt in data["attempts"]:
        folder = run_dir / "attempts" / attempt["recipe"]
        if attempt["decision"] == "rejected":
            assert sorted(p.name for p in folder.iterdir()) == ["validation"]
            assert (folder / "validation" / "report.json").is_file()
            assert not (run_dir / attempt["applied"]).exists()
        elif attempt["decision"] != "kept":
            assert not folder.exists() and not (run_dir / attempt["applied"]).exists()
    assert not list(run_dir.glob("attempts/*/artifact")) and not list(run_dir.glob(".*.partial-*"))
    # after the search: ORT lowering, no engine claimed without TensorRT, a Jetson bundle
    assert (run_dir / f"{kept[0]['applied']}-ort" / "model.onnx").is_file()
    engine = data["engine"]
    assert "skipped" in engine or engine["note"] == "built, not executed"
    assert data["bundle"]["path"].endswith(".tar.gz") and (run_dir / data["bundle"]["path"]).is_file()
    assert json.loads((run_dir / "compile.json").read_text())["kept"] == data["kept"]


def test_recipe_the_target_cannot_run_is_skipped_with_the_reason(orin_nano_run):
    result, _ = orin_nano_run
    fp8 = next(a for a in json.loads(result.stdout)["attempts"] if a["recipe"] == "fp8")
    assert fp8["decision"] == "skipped"
    assert "jetson-orin-nano has no fp8" in fp8["reason"] and fp8["gates"] is None


def test_json_lists_every_attempt(orin_nano_run):
    result, _ = orin_nano_run
    data = json.loads(result.stdout)
    assert sorted(a["recipe"] for a in data["attempts"]) == ["fp16", "fp8", "int8-wo"]
    for attempt in data["attempts"]:
        memory = attempt["memory"]
        assert memory["usable_gb"] == 6.0 and 0 < memory["needed_gb"] < memory["usable_gb"]
        assert attempt["decision"] in ("kept", "rejected", "skipped", "not applicable", "not tried")
    assert data["target"] == "jetson-orin-nano" and data["passed"] is True


def test_model_too_large_for_the_target_is_skipped_before_any_work(tmp_path, monkeypatch):
    """qwen3-14b at full width and depth: even INT4 needs more than the Orin Nano's 6 GB, which the plan
    says from the architecture alone: nothing is loaded, exported or quantized, and the exit code is 1."""
    import qwen3_compile.compile_target as compile_target

    def no_work(*args, **kwargs):
        raise AssertionError("the plan must refuse before loading the model")

    monkeypatch.setattr(compile_target, "load_model", no_work)
    result = _invoke(
        ["compile", "qwen3-14b", "--target", "jetson-orin-nano", "--recipes", "int4-rtn,int8-wo,fp16"]
        + ["-o", tmp_path, "--json"]
    )
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is False and data["kept"] is None
    assert [a["recipe"] for a in data["attempts"]] == ["int4-rtn", "int8-wo", "fp16"]  # smallest first
    for attempt in data["attempts"]:
        assert attempt["decision"] == "skipped" and attempt["gates"] is None
        needed = attempt["memory"]["needed_gb"]
        assert needed > 6.0
        assert f"needs {needed:.2f} GB > 6 GB usable" in attempt["reason"]
    run_dir = tmp_path / "qwen3-14b"
    assert sorted(p.name for p in run_dir.iterdir()) == ["compile.json"]


def test_unknown_recipe_is_exit_2_naming_the_option(tmp_path):
    result = _invoke(
        ["compile", "trained-dense", "--target", "jetson-orin-nano", "--recipes", "int8-wo,int9"]
    )
    assert result.exit_code == 2
    assert "'--recipes'" in result.output and "'int9'" in result.output and "int4-awq" in result.output
    result = _invoke(
        ["compile", "trained-dense", "--target", "jetson-orin-nano", "--recipes", "int9", "--json"]
        + ["-o", tmp_path]
    )
    assert result.exit_code == 2 and json.loads(result.stdout)["field"] == "--recipes"
    assert not (tmp_path / "trained-dense").exists()


def test_search_options_need_a_target(tmp_path):
    result = _invoke(["compile", "trained-dense", "--recipes", "int8-wo", "-o", tmp_path])
    assert result.exit_code == 2 and "--target" in result.output
    assert not (tmp_path / "trained-dense").exists()


def test_int4_group_that_does_not_divide_the_model_is_not_applicable(tmp_path):
    """int4-rtn's own group (128) does not divide trained-dense's 32-wide layers: quantize refuses before any
    work, the search records why and goes on (here to nothing: exit 1), leaving no attempt folder."""
    result = _invoke(
        ["compile", "trained-dense", "--target", "jetson-orin-nano", "--recipes", "int4-rtn"]
        + ["-o", tmp_path, "--json", *FAST]
    )
    assert result.exit_code == 1, result.output
    (attempt,) = json.loads(result.stdout)["attempts"]
    assert attempt["decision"] == "not applicable" and "128" in attempt["reason"]
    assert not (tmp_path / "trained-dense" / "attempts" / "int4-rtn").exists()


def test_int4_moe_experts_are_skipped_before_any_work(tmp_path):
    """No TensorRT engine takes INT4 experts yet, so on a MoE the INT4 recipes are not candidates."""
    result = _invoke(
        ["compile", "trained-moe", "--target", "jetson-orin-nano", "--recipes", "int4-rtn,int4-awq"]
        + ["--group-size", "32", "-o", tmp_path, "--json"]
    )
    assert result.exit_code == 1, result.output
    attempts = json.loads(result.stdout)["attempts"]
    assert [a["decision"] for a in attempts] == ["skipped", "skipped"]
    assert all("INT4 MoE experts" in a["reason"] for a in attempts)
    assert sorted(p.name for p in (tmp_path / "trained-moe").iterdir()) == ["compile.json"]


# ---- a published quantized checkpoint: compiled as stored, never re-quantized ------------------------


def test_awq_checkpoint_compiles_as_stored_for_an_orin_nano(tmp_path):
    """A downloaded AWQ checkpoint (the tests' own packer) -> compile --target jetson-orin-nano: one
    candidate, the checkpoint's own INT4 weights at their stored size, exported and validated against its
    own dequantization, then lowered for ONNX Runtime and bundled (TensorRT's graph without zero points)."""
    import onnx
    from safetensors.torch import load_file

    from qwen3_compile.bundle.archive import safe_extract
    from qwen3_compile.sizing import GB
    from qwen3_compile.storage.manifest import read_manifest

    from .models.quantized_checkpoints import save_quantized_checkpoint

    checkpoint = tmp_path / "Qwen3-tiny-AWQ"
    save_quantized_checkpoint(checkpoint, "tiny-dense", "awq")
    out = tmp_path / "out"
    result = _invoke(["compile", checkpoint, "--target", "jetson-orin-nano", "-o", out, "--json", *FAST])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (attempt,) = data["attempts"]
    assert attempt["recipe"] == "as-stored" and attempt["applied"] == "awq-int4-g32 (as stored)"
    assert attempt["decision"] == "kept" and attempt["precisions"] == ["int4"]
    # the stored size, counted from the file: AWQ's tensors as stored, every other weight in fp16
    tensors = load_file(str(checkpoint / "model.safetensors"))
    quantized = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".qweight")}
    want = sum(
        t.numel() * (t.element_size() if n.rsplit(".", 1)[0] in quantized else 2) for n, t in tensors.items()
    )
    assert attempt["weight_bytes"] == want
    inspected = json.loads(_invoke(["inspect", checkpoint, "--json"]).stdout)
    assert inspected["weight_gb"] == {"int4": pytest.approx(want / GB)}
    kept = tmp_path / "out" / "Qwen3-tiny-AWQ" / "as-stored"
    manifest = read_manifest(kept)
    assert manifest.stage == "export" and manifest.imported["method"] == "awq"
    assert manifest.options.dtype == "fp16"  # AWQ's scales are fp16: exact in an fp16 graph
    assert attempt["gates"]["mean_kl"] <= attempt["gates"]["max_mean_kl"]
    folder = tmp_path / "device"
    safe_extract(Path(data["bundle"]["path"]), folder)
    graph = onnx.load(str(folder / "model" / "model.onnx"), load_external_data=False).graph
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize and all(len(n.input) == 2 for n in dequantize)  # no zero point left for TensorRT


def test_published_checkpoint_the_target_cannot_run_is_skipped_and_recipes_refused(tmp_path):
    """FP8 weights on an Orin (no FP8): skipped before any work, exit 1; --recipes on a published quantized
    checkpoint: exit 2 naming the option (it is never re-quantized)."""
    from .models.quantized_checkpoints import save_quantized_checkpoint

    checkpoint = tmp_path / "Qwen3-tiny-FP8"
    save_quantized_checkpoint(checkpoint, "tiny-dense", "fp8", block=(32, 32))
    out = tmp_path / "out"
    result = _invoke(["compile", checkpoint, "--target", "jetson-orin-nano", "-o", out, "--json"])
    assert result.exit_code == 1, result.output
    (attempt,) = json.loads(result.stdout)["attempts"]
    assert attempt["decision"] == "skipped" and "has no fp8" in attempt["reason"]
    assert sorted(p.name for p in (tmp_path / "out" / "Qwen3-tiny-FP8").iterdir()) == ["compile.json"]
    result = _invoke(
        ["compile", checkpoint, "--target", "h100", "--recipes", "int8-wo", "-o", tmp_path / "o2", "--json"]
    )
    assert result.exit_code == 2 and json.loads(result.stdout)["field"] == "--recipes"
    assert not (tmp_path / "o2").exists()
