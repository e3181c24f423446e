"""The `bundle` stage: a validated export/quantize artifact + a Jetson target -> one reproducible .tar.gz.

Order: every refusal first (target flavour, precision on the target, memory fit from the architecture,
a passing validation report), then the smoke reference tokens, the build stage's lowering for the target
(the deployment graph: the target's MoE lowering, logits of the newest token), the optimisation profiles,
the side files, the device scripts, the README and the manifest (sha256 of every file), and the archive
(written beside the output and renamed when complete).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import string
import tempfile
import time
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qwen3_compile import __version__
from qwen3_compile.backends.onnxruntime.settings import ort_optimization, ort_session_config
from qwen3_compile.backends.tensorrt.profiles import InputSpec, generation_profiles
from qwen3_compile.bundle.archive import folder_files, write_reproducible_tar
from qwen3_compile.bundle.checks import BundlePlan, check_bundle_target
from qwen3_compile.bundle.reference import (
    REPORT_DIR,
    REPORT_FILES,
    SMOKE_PROMPT,
    SMOKE_TOKENS,
    require_validation,
    smoke_reference,
    validation_record,
)
from qwen3_compile.engine.inputs import MODEL_FILE, BuildInput, read_build_input
from qwen3_compile.errors import BadInputError
from qwen3_compile.lower.for_tensorrt import LoweredModel, MoeChoice, choose_moe_lowering, lower_for_build
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.schema import decode
from qwen3_compile.sizing import GB
from qwen3_compile.storage.artifact_dir import (
    check_not_an_input,
    copy_side_files,
    held,
    load_graph,
    remove_stale_partials,
)
from qwen3_compile.storage.manifest import CALIBRATION_FILE, MANIFEST, sha256_file, tool_versions
from qwen3_compile.storage.manifests import BundleManifest, ExportManifest, QuantizeManifest, ValidationRecord
from qwen3_compile.targets import Target, get_target, target_to_dict

BUNDLE_FORMAT = 1
DEFAULT_CONTEXT = 4096
PLUGIN_LIBRARY = "build/plugin/libqmoe_trt_plugin.so"  # where build_plugin.sh puts it
EXECUTABLES = ("runner.py", "build_engine.py", "build_plugin.sh")
DEVICE_SCRIPTS = ("runner.py", "trt_backend.py", "build_engine.py", "bundle_files.py", "build_plugin.sh")
_SKIP_SIDE = (MODEL_FILE, MANIFEST, CALIBRATION_FILE)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: BundleManifest = field(repr=False)
    bytes: int
    sha256: str
    seconds: dict[str, float]


def bundle_moe_choice(build_input: BuildInput, target: Target) -> MoeChoice:
    """The build stage's choice for a device running the target's minimum TensorRT, with the plugin as a
    library the device builds from the shipped sources (the bundle cannot know the device's TensorRT:
    a lowering that needs a newer one, e.g. TRT_MoE on Thor before 10.16, is skipped with that reason)."""
    oldest = types.SimpleNamespace(__name__="tensorrt", __version__=target.min_tensorrt)
    choice = choose_moe_lowering(build_input.arch, target, oldest, None, (Path(PLUGIN_LIBRARY),))
    why = f" (a bundle must build with {target.name}'s oldest supported TensorRT, {target.min_tensorrt})"
    return dataclasses.replace(choice, skipped={k: v + why for k, v in choice.skipped.items()})


def _graph_inputs(model_path: Path) -> list[InputSpec]:
    graph = load_graph(model_path).graph
    return [
        InputSpec(
            i.name,
            tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim),
        )
        for i in graph.input
    ]


def _warnings(build_input: BuildInput, moe_lowering: str) -> list[str]:
    warnings = []
    if build_input.dtype == "fp32":
        warnings.append(
            "the artifact comes from an fp32 export: a strongly typed engine keeps every unquantized tensor "
            "in fp32 (a parity build, twice the memory and bandwidth of fp16); for deployment export with "
            "--dtype fp16 (then quantize)"
        )
    if moe_lowering == "dense":
        warnings.append(
            "the MoE layers are lowered densely (every expert computed for every token, see moe.skipped): "
            "correct but slow on a real MoE; the plugin takes fp16/bf16 or INT8 weight-only experts "
            "(int8-wo or fp16 on an fp16 export) of kernel-supported shapes"
        )
    return warnings


def _place(source: Path, dest: Path) -> None:
    """A hard link where the file system allows (a 30B model's weights are not copied to be archived),
    else a copy; symbolic links are followed either way."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _model_name(manifest: ExportManifest | QuantizeManifest) -> str | None:
    """The preset or checkpoint an artifact came from (an export's inputs, or a quantize's source's)."""
    inputs = manifest.inputs if isinstance(manifest, ExportManifest) else manifest.inputs.source or {}
    model = inputs.get("model")
    return Path(str(model)).name if model else None


def _trtexec(profiles: list[dict], plugin: bool) -> str:
    """The trtexec alternative with one profile, the chunked-prefill one: it admits every call the runner
    makes (prompts in chunks of up to 512 tokens, then one token at a time)."""
    parts = ["trtexec --onnx=model/model.onnx --stronglyTyped --saveEngine=engine/model.plan"]
    if plugin:
        parts.append(f"--dynamicPlugins={PLUGIN_LIBRARY}")
    for profile in [p for p in profiles if p["name"] == "chunked"]:
        for key in ("min", "opt", "max"):
            shapes = ",".join(
                f"{name}:{'x'.join(str(d) for d in s[key])}" for name, s in profile["shapes"].items()
            )
            parts.append(f"--{key}Shapes={shapes}")
    return " \\\n  ".join(parts)


def _copy_device_files(staging: Path, target: Target) -> None:
    device = resources.files("qwen3_compile.bundle").joinpath("device")
    for name in DEVICE_SCRIPTS:
        text = device.joinpath(name).read_text()
        if name == "build_plugin.sh":
            text = text.replace("@SM_ARCH@", target.sm.replace(".", ""))
        (staging / name).write_text(text)
        (staging / name).chmod(0o755 if name in EXECUTABLES else 0o644)


def _copy_plugin_sources(staging: Path) -> None:
    source = resources.files("qwen3_compile").joinpath("plugins", "moe")
    with resources.as_file(source) as folder:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and (
                path.suffix in (".cu", ".cuh", ".h", ".cpp") or path.name == "CMakeLists.txt"
            ):
                out = staging / "plugins" / "moe" / path.relative_to(folder)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, out)


def _plugin_row(moe: dict[str, Any]) -> str:
    if moe["lowering"] == "plugin":
        return "the MoE plugin's CUDA sources and CMake (the graph has `Qwen3MoE` plugin nodes)"
    why = "; ".join(f"{k}: {v}" for k, v in moe["skipped"].items()) or "no MoE layers"
    return f"not shipped: the graph has no plugin node ({why})"


def _readme(manifest: dict[str, Any], plan: BundlePlan) -> str:
    template = resources.files("qwen3_compile.bundle").joinpath("device", "README.md.in").read_text()
    target, moe, smoke = manifest["target"], manifest["moe"], manifest["smoke_reference"]
    mem = plan.memory
    validation = manifest["validation"]
    summary = validation["summary"]
    plugin = moe["lowering"] == "plugin"
    return string.Template(template).substitute(
        model=manifest["artifact"]["model"],
        target_name=target["name"],
        target_description=target["description"],
        sm=target["sm"],
        min_tensorrt=target["min_tensorrt"],
        label=manifest["artifact"]["label"],
        stage=manifest["artifact"]["stage"],
        version=__version__,
        moe_lowering=moe["lowering"],
        plugin_row=_plugin_row(moe),
        validation=f"{validation['gates_source']}: prefill mean KL {summary['prefill']['mean_kl']:.3g}, "
        f"top-1 {summary['prefill']['top1']:.2%} against {validation['reference']} in PyTorch",
        context=plan.context,
        context_minus_one=plan.context - 1,
        weights_gb=f"{mem.weights / GB:.2f}",
        kv_gb=f"{mem.kv_cache / GB:.2f}",
        act_gb=f"{mem.activations / GB:.2f}",
        total_gb=f"{mem.total / GB:.2f}",
        usable_gb=f"{mem.usable / GB:.1f}",
        plugin_step=(
            f"bash build_plugin.sh   # -> {PLUGIN_LIBRARY}"
            if plugin
            else "# no plugin to build: the graph has no plugin node"
        ),
        trtexec=manifest["trtexec"],
        smoke_tokens=smoke["max_new_tokens"] if smoke else 16,
        smoke_prompt=smoke["prompt"] if smoke else SMOKE_PROMPT,
        smoke_expect=(
            "Greedy tokens to expect, recorded from the validated artifact on ONNX Runtime (`manifest.json`, "
            f"`smoke_reference`): non-thinking `{smoke['modes']['non-thinking']['tokens']}`; thinking "
            f"`{smoke['modes']['thinking']['tokens']}`."
            if smoke
            else "No reference tokens were recorded for this bundle (`bundle --smoke-tokens 0`)."
        ),
    )


def _copy_side_files(staging: Path, artifact: Path, target: Target, plugin: bool) -> None:
    """Everything but the graph: tokenizer/config, reference functions, the report, device scripts,
    plugin sources (plugin graphs only)."""
    copy_side_files(artifact, staging / "model", skip=_SKIP_SIDE)
    (staging / "reference").mkdir()
    graphs = resources.files("qwen3_compile").joinpath("graphs")
    for name in ("expert_dispatch.onnxtxt", "quantized_expert_dispatch.onnxtxt"):
        (staging / "reference" / name).write_text(graphs.joinpath(name).read_text())
    (staging / REPORT_DIR).mkdir()
    for name in REPORT_FILES:
        if (artifact / REPORT_DIR / name).is_file():
            shutil.copyfile(artifact / REPORT_DIR / name, staging / REPORT_DIR / name)
    _copy_device_files(staging, target)
    if plugin:
        _copy_plugin_sources(staging)


def _manifest(
    artifact: Path,
    build_input: BuildInput,
    target: Target,
    plan: BundlePlan,
    lowered: LoweredModel,
    profiles: list[dict],
    report: ValidationRecord,
    smoke: dict[str, Any] | None,
    model_sha256: str,
) -> dict[str, Any]:
    """The bundle's manifest, less the file list (added once every file is written)."""
    source = build_input.manifest
    return {
        "format": BUNDLE_FORMAT,
        "stage": "bundle",
        "artifact": {
            "folder": artifact.name,
            "model": _model_name(source) or artifact.name,
            "stage": source.stage,
            "label": build_input.label,
            "dtype": build_input.dtype,
            "model_sha256": model_sha256,
        },
        "architecture": source.architecture,
        "recipe": getattr(source, "recipe", None),
        "target": target_to_dict(target),
        "tools": tool_versions(),
        "memory": plan.to_dict(),
        "moe": {
            "lowering": lowered.moe.lowering,
            "skipped": lowered.moe.skipped,
            "plugin_library": PLUGIN_LIBRARY if lowered.moe.lowering == "plugin" else None,
        },
        "lowering": lowered.report,
        "op_histogram": lowered.op_histogram,
        "logits": "last",
        "profiles": profiles,
        "ort_optimization": ort_optimization(source),
        "ort_session_config": ort_session_config(source),
        "validation": validation_record(report),
        "smoke_reference": smoke,
        "warnings": _warnings(build_input, lowered.moe.lowering),
        "trtexec": _trtexec(profiles, lowered.moe.lowering == "plugin"),
    }


def bundle_artifact(
    artifact: str | Path,
    target: str,
    output: str | Path,
    *,
    max_seq: int | None = None,
    smoke_tokens: int = SMOKE_TOKENS,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> Bundle:
    """Bundle `artifact` (an export or quantize folder with a passing validation report) for `target`.
    `smoke_tokens`: greedy tokens of the artifact on ONNX Runtime CPU to record per reasoning mode (0: none;
    a large MoE's canonical graph computes every expert on the CPU, minutes per token)."""
    artifact, output = Path(artifact), Path(output)
    check_not_an_input(output, [artifact])
    if output.is_dir() or output.is_symlink():
        raise BadInputError(
            "is a folder or a link; a bundle is one .tar.gz file.",
            file=output,
            field="--output",
            fix="name a file, for example OUT.tar.gz.",
        )
    if output.exists() and not force:
        raise BadInputError(
            "the output file already exists.",
            file=output,
            field="--output",
            fix="pass --force to replace it.",
        )
    remove_stale_partials(output)
    build_input = read_build_input(artifact)
    deploy = get_target(target)
    if deploy.tensorrt != "tensorrt":
        raise BadInputError(
            f"{deploy.name} uses {deploy.tensorrt}; bundles are for devices with standard TensorRT (Jetson).",
            field="--target",
            fix="use `qwen3-compile build` for TensorRT-RTX targets.",
        )
    context = max_seq or min(build_input.arch.max_position_embeddings, DEFAULT_CONTEXT)
    plan = check_bundle_target(build_input, deploy, context)
    # hashed once, for the report's check, the smoke reference and the manifest
    model_sha256 = sha256_file(build_input.model_path)
    report = require_validation(artifact, model_sha256)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    with progress.stage("bundle", total=4, unit="steps") as advance:
        smoke = (
            smoke_reference(artifact, build_input.manifest, smoke_tokens, model_sha256)
            if smoke_tokens
            else None
        )
        seconds["smoke_reference"], clock = round(time.perf_counter() - clock, 3), time.perf_counter()
        advance(1)
        output.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix=f".{output.name}.partial-", dir=output.parent) as tmp,
            held(tmp),
        ):
            staging, scratch = Path(tmp) / "bundle", Path(tmp) / "lowered"
            (staging / "model").mkdir(parents=True)
            scratch.mkdir()
            choice = bundle_moe_choice(build_input, deploy)
            lowered = lower_for_build(build_input.model_path, choice, scratch, last_logits=True)
            for path in sorted(scratch.iterdir()):  # the graph and its data files
                _place(path, staging / "model" / path.name)
            seconds["lower"], clock = round(time.perf_counter() - clock, 3), time.perf_counter()
            advance(1)
            _copy_side_files(staging, artifact, deploy, lowered.moe.lowering == "plugin")
            profiles = [
                p.to_dict()
                for p in generation_profiles(_graph_inputs(staging / "model" / "model.onnx"), 1, context)
            ]
            manifest = _manifest(
                artifact, build_input, deploy, plan, lowered, profiles, report, smoke, model_sha256
            )
            (staging / "README.md").write_text(_readme(manifest, plan))
            manifest["files"] = {
                name: {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
                for name in folder_files(staging)
            }
            text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
            (staging / MANIFEST).write_text(text)
            manifest = decode(BundleManifest, json.loads(text), file=staging / MANIFEST)
            advance(1)
            partial = Path(tmp) / "bundle.tar.gz"
            archive_sha256 = write_reproducible_tar(staging, partial)
            os.replace(partial, output)
            seconds["write"] = round(time.perf_counter() - clock, 3)
            advance(1)
    return Bundle(output, manifest, output.stat().st_size, archive_sha256, seconds)
