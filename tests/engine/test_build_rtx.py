"""TensorRT-RTX plans of tiny-dense and tiny-moe for every input TensorRT-RTX takes: fp32/fp16 exports and
every built-in recipe the target supports (new recipes join automatically). TensorRT-RTX builds ahead of
time without a GPU; the plans are not executed here (no engine runs on this machine)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import onnx
import pytest

from qwen3_compile.engine import BuildOptions, build_engine
from qwen3_compile.engine.inputs import check_target_supports, read_build_input
from qwen3_compile.errors import BadInputError
from qwen3_compile.quantize.compat import fitting_recipes
from qwen3_compile.schema import encode
from qwen3_compile.storage.manifest import read_manifest
from qwen3_compile.targets import get_target

if os.environ.get("QWEN3_COMPILE_REQUIRE_RTX") == "1" and importlib.util.find_spec("tensorrt_rtx") is None:
    raise RuntimeError("QWEN3_COMPILE_REQUIRE_RTX=1 (CI) but tensorrt_rtx is not installed")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt_rtx: pip install '.[rtx]'"
)
TARGET = "rtx-blackwell"


# every built-in recipe the RTX target can run (its precisions and SM)
INPUTS = [
    "export:fp32",
    "export:fp16",
    "export:bf16",
    *(f"recipe:{r}" for r in fitting_recipes(get_target(TARGET))),
]


def _input(artifacts, preset, kind):
    what, name = kind.split(":")
    return artifacts.export(preset, name) if what == "export" else artifacts.quantized(preset, name)


def _cases():
    """(preset, input) for both presets and every input. tiny-moe with int4-awq is in the slow job: it is
    refused before any work like int4-rtn (INT4 weights that select the experts), and the AWQ search it needs
    first is the longest quantization of the suite."""
    for preset in ("tiny-dense", "tiny-moe"):
        for kind in INPUTS:
            slow = preset == "tiny-moe" and kind == "recipe:int4-awq"
            yield pytest.param(preset, kind, marks=pytest.mark.slow) if slow else (preset, kind)


@pytest.mark.parametrize("preset, kind", _cases())
def test_builds_plan_with_log_and_manifest(artifacts, preset, kind, tmp_path):
    source = _input(artifacts, preset, kind)
    if preset == "tiny-moe" and kind.startswith("recipe:int4"):
        # TensorRT-RTX 1.7.1's builder dies with a segmentation fault (the process, no error) on INT4 experts
        # (blocked DequantizeLinear on [E, rows, in], dense MoE lowering): refused before any work instead
        out = tmp_path / "engine"
        with pytest.raises(BadInputError, match="INT4") as refused:
            build_engine(source, BuildOptions(TARGET, max_batch=2, max_seq=256), out)
        assert refused.value.field == "recipe.weights.dtype" and "int8-wo" in refused.value.fix
        assert not out.exists() and not list(tmp_path.glob(".engine.partial-*"))
        return
    check_target_supports(read_build_input(source), get_target(TARGET))
    out = tmp_path / "engine"
    built = build_engine(source, BuildOptions(TARGET, max_batch=2, max_seq=256), out)

    plan = (out / "model.plan").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert read_manifest(out) == built.manifest and encode(built.manifest) == manifest  # typed round trip
    assert len(plan) == built.plan_bytes == manifest["outputs"]["model.plan"]["bytes"] > 1_000_000
    assert hashlib.sha256(plan).hexdigest() == manifest["outputs"]["model.plan"]["sha256"]
    assert manifest["stage"] == "build"
    assert manifest["tensorrt"] == dict(flavour="tensorrt-rtx", module="tensorrt_rtx", version="1.7.1.116")
    assert manifest["target"]["sm"] == "12.0" and manifest["attention"] == "decomposed"
    assert [p["name"] for p in manifest["profiles"]] == ["prefill", "decode", "chunked"]
    assert manifest["profiles"][1]["shapes"]["attention_mask"]["max"] == [2, 256]
    assert manifest["engine"]["build_s"] > 0 and manifest["memory"]["fits"]
    recipe = manifest["recipe"]
    wanted = kind.split(":")[1] if kind.startswith("recipe:") else None
    assert (recipe or {}).get("name") in (wanted, f"{wanted}-g32")  # INT4 at group 32 (conftest)
    # the graph TensorRT parsed: no project op left, and MoE lowered densely (no plugin exists yet)
    assert not any(op.startswith("qwen3_compile::") for op in manifest["op_histogram"])
    if preset == "tiny-moe":
        assert built.moe_lowering == "dense" and "plugin" in manifest["moe"]["skipped"]
        assert sum(manifest["lowering"]["applied"].values()) == 2
    else:
        assert built.moe_lowering == "none"
    log = (out / "build.log").read_text()
    assert "built in" in log and "not self-consistent" not in log  # TensorRT's check of the profiles
    for side in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / side).read_bytes() == (source / side).read_bytes()


def test_ada_build_targets_sm89(artifacts, tmp_path):
    source = artifacts.export("tiny-moe", "fp16")
    built = build_engine(source, BuildOptions("rtx-ada", max_seq=128), tmp_path / "e")
    assert built.manifest.target.sm == "8.9" and built.moe_lowering == "dense"


def test_lowered_onnx_passes_checker_and_shape_inference(artifacts, tmp_path):
    """The graph every target's lowerings hand the parser (what build writes to its scratch folder), on a MoE
    the plugin takes (128 wide), each with full logits and one (the plugin's) with last-position logits too:
    the last-logits rule does not touch the MoE nodes, so one MoE lowering covers it."""
    from qwen3_compile.lower.for_tensorrt import MoeChoice, lower_for_build
    from qwen3_compile.targets import all_targets

    lowerings = {lowering for target in all_targets().values() for lowering in target.moe_lowerings}
    assert lowerings == {"trt_moe", "plugin", "dense"}
    source = artifacts.plugin_sized_moe("fp16") / "model.onnx"
    for lowering in sorted(lowerings):
        for last in (False, True) if lowering == "plugin" else (False,):
            scratch = tmp_path / f"{lowering}-{last}"
            scratch.mkdir()
            lowered = lower_for_build(source, MoeChoice(lowering), scratch, last_logits=last)
            assert lowered.moe.lowering == lowering
            model = onnx.load(str(lowered.path))
            onnx.checker.check_model(model, full_check=True)
            onnx.shape_inference.infer_shapes(model, strict_mode=True)
            assert not any(n.domain == "qwen3_compile" for n in model.graph.node)


def test_trt_moe_parses_but_tensorrt_rtx_cannot_build_it(artifacts, tmp_path):
    """Measured with tensorrt-rtx 1.7.1: the parser imports TRT_MoE (IMoELayer) but the builder fails for
    SM 8.9/12.x. If this starts passing the build, TensorRT-RTX gained the layer: revisit the RTX targets."""
    from qwen3_compile.errors import CheckFailedError

    out = tmp_path / "engine"
    options = BuildOptions(TARGET, max_seq=128, moe_lowering="trt_moe")
    with pytest.raises(CheckFailedError, match="(?i)moe") as info:
        build_engine(artifacts.export("tiny-moe", "fp16"), options, out)
    assert not out.exists() and "build log:" in info.value.message
    log = (tmp_path / "engine.failed-build.log").read_text()
    assert "parsed model.onnx" in log and "expert_dispatch_to_trt_moe" in log


def test_compile_main_job_builds_an_engine(artifacts, tmp_path, monkeypatch):
    from pathlib import Path
    from types import SimpleNamespace

    from qwen3_compile import pipeline
    from qwen3_compile.progress import NO_PROGRESS

    exported = {"canonical": SimpleNamespace(directory=artifacts.export("tiny-moe"))}
    engine = pipeline._build_engine(exported, tmp_path, NO_PROGRESS)
    assert Path(engine["path"]).stat().st_size == engine["bytes"] > 1_000_000
    assert engine["target"] == "rtx-blackwell" and engine["moe_lowering"] == "dense"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "qwen3-compile[rtx]" in pipeline._build_engine(exported, tmp_path, NO_PROGRESS)["skipped"]


@pytest.mark.parametrize("recipe", [None, "int8-wo", "int4-rtn"])
def test_plugin_lowering_builds_with_the_python_plugin(artifacts, tmp_path, recipe):
    """The qmoe plugin node (fp16, or INT8 / INT4 weight-only experts: int4-rtn at group 32, kINT4 plugin
    inputs) parsed and built by TensorRT-RTX with the project's Python IPluginV3 registered. Run through the
    CLI in a subprocess: a crash inside TensorRT's plugin callbacks must fail this test, not the session."""
    import subprocess
    import sys

    source = (
        artifacts.plugin_sized_moe("fp16") if recipe is None else artifacts.plugin_sized_quantized(recipe)
    )
    out = tmp_path / "engine"
    cmd = [sys.executable, "-m", "qwen3_compile.cli", "build", str(source), "--target", TARGET]
    proc = subprocess.run(
        [*cmd, "--max-seq", "128", "-o", str(out), "--json"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["moe"] == {
        "lowering": "plugin",
        "skipped": {},
        "plugin": "python:qwen3_compile.kernels.trt_python_plugin",
    }
    assert manifest["op_histogram"]["trt.plugins::Qwen3MoE"] == 2
    assert manifest["lowering"]["applied"] == {"expert_dispatch_to_qwen3_moe_plugin": 2}
    assert (out / "model.plan").stat().st_size == manifest["engine"]["bytes"]


def test_int4_experts_lowered_densely_are_refused_before_the_parse(artifacts, tmp_path):
    """INT4 experts the plugin would take, but --moe-lowering dense asked for: an error, not the TensorRT-RTX
    1.7.1 builder crash that dense INT4 experts cause."""
    source = artifacts.plugin_sized_quantized("int4-rtn")
    out = tmp_path / "engine"
    with pytest.raises(BadInputError, match="INT4 experts must all be lowered to the qmoe plugin") as refused:
        build_engine(source, BuildOptions(TARGET, max_seq=128, moe_lowering="dense"), out)
    assert refused.value.field == "--moe-lowering" and not out.exists()


def test_deployment_graph_with_last_position_logits(artifacts, tmp_path):
    source = artifacts.export("tiny-moe", "fp16")
    full = build_engine(source, BuildOptions(TARGET, max_seq=1024), tmp_path / "all")
    last = build_engine(source, BuildOptions(TARGET, max_seq=1024, logits="last"), tmp_path / "last")
    assert last.manifest.options.logits == "last" and last.moe_lowering == "dense"
    assert last.manifest.lowering["applied"]["last_position_logits"] == 1
    # activations: 1024 positions of fp32 logits over the 151936-token vocabulary become one
    saved = full.manifest.memory.activations - last.manifest.memory.activations
    assert saved == (1024 - 1) * 151936 * 4
