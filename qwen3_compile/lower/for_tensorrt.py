"""Which MoE lowering a build uses, and the lowered ONNX the parser reads.

A target lists its lowerings in order of preference (`moe_lowerings` in recipes/targets/*.toml); the build
takes the first one it can use here and records the others with the reason they were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from qwen3_compile.backends.tensorrt.shim import version_tuple
from qwen3_compile.errors import BadInputError, CheckFailedError
from qwen3_compile.kernels.trt_contract import PYTHON_PLUGIN
from qwen3_compile.lower.files import op_histogram, rewrite_file
from qwen3_compile.lower.trt_zero_points import has_zero_point_weights
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.storage.artifact_dir import load_graph
from qwen3_compile.targets import MOE_LOWERINGS, Target

# MoE lowering -> rule set in qwen3_compile.lower.RULE_SETS
RULE_SET = {"trt_moe": "trt-moe", "plugin": "trt-plugin", "dense": "trt-dense"}
TRT_MOE_MIN_TENSORRT = "10.16"  # IMoELayer, SM 10.x/11.x


@dataclass(frozen=True)
class MoeChoice:
    lowering: str  # "none" for dense models
    skipped: dict[str, str] = field(default_factory=dict)  # preferred lowerings not used, and why
    plugin: str | None = None  # plugin lowering: PYTHON_PLUGIN, or "library" (--plugin)


def _python_plugin(trt: ModuleType) -> str | None:
    """Register the project's Python IPluginV3 for the qmoe kernels; None when it worked, else why not."""
    try:
        from qwen3_compile.kernels.trt_python_plugin import register
    except ImportError as err:
        return f"the Python plugin is not available ({err})"
    try:
        register(trt)
    except Exception as err:  # PluginSetupError: no C compiler for TensorRT-RTX's library shim, ...
        return f"the Python plugin could not be registered ({err})"
    return None


def _unusable(lowering: str, trt: ModuleType, libraries: tuple[Path, ...]) -> str | None:
    if lowering == "plugin" and not libraries:
        return _python_plugin(trt)
    if lowering == "trt_moe" and trt.__name__ == "tensorrt":
        if version_tuple(trt.__version__) < version_tuple(TRT_MOE_MIN_TENSORRT):
            return f"TRT_MoE needs TensorRT >= {TRT_MOE_MIN_TENSORRT}; this is {trt.__version__}"
    return None


def choose_moe_lowering(
    arch: Qwen3Arch,
    target: Target,
    trt: ModuleType,
    requested: str | None,
    libraries: tuple[Path, ...] = (),
) -> MoeChoice:
    """The first of the target's lowerings (or `requested`) usable here. `plugin` uses the plugin
    libraries given (--plugin), else registers the project's Python plugin."""
    if not arch.is_moe:
        return MoeChoice("none")
    if requested is not None and requested not in MOE_LOWERINGS:
        raise BadInputError(
            f"unknown MoE lowering '{requested}'.",
            field="--moe-lowering",
            fix=f"use one of: {', '.join(MOE_LOWERINGS)}.",
        )
    skipped = {}
    for lowering in [requested] if requested else target.moe_lowerings:
        reason = _unusable(lowering, trt, libraries)
        if reason is None:
            plugin = ("library" if libraries else PYTHON_PLUGIN) if lowering == "plugin" else None
            return MoeChoice(lowering, skipped, plugin)
        skipped[lowering] = reason
    raise BadInputError(
        f"MoE lowering '{requested}' cannot be used with {trt.__name__} {trt.__version__}: "
        f"{skipped[requested]}.",
        field="--moe-lowering",
        fix=f"leave --moe-lowering out (the target's order is {', '.join(target.moe_lowerings)}).",
    )


@dataclass(frozen=True)
class LoweredModel:
    path: Path
    report: dict
    op_histogram: dict[str, int]
    moe: MoeChoice  # what the graph got: a lowering whose rule declined every node falls back to dense


def _effective(choice: MoeChoice, declines: dict[str, str], total: int) -> MoeChoice:
    if not declines:
        return choice
    first = next(iter(declines.values()))
    if len(declines) < total:  # mixed: record which nodes went dense
        return MoeChoice(
            choice.lowering, choice.skipped | {"dense_for": f"{sorted(declines)}: {first}"}, choice.plugin
        )
    return MoeChoice("dense", choice.skipped | {choice.lowering: f"declined every MoE node: {first}"})


def lower_for_build(
    model_path: Path, choice: MoeChoice, scratch: Path, last_logits: bool = False, *, keep_input: bool = True
) -> LoweredModel:
    """The graph the parser reads: `model_path` itself when nothing is rewritten (`keep_input`), else a
    lowered copy in `scratch` whose external data links to the artifact's, plus a file of new weights.
    `last_logits`: the deployment graph's logits, last position only. `keep_input=False` (the lower
    stage's own folder): always write the copy, its data hard-linked or copied, never symlinked."""
    from qwen3_compile.lower import RULE_SETS

    model = load_graph(model_path)
    rules = [] if choice.lowering == "none" else [r() for r in RULE_SETS[RULE_SET[choice.lowering]]]
    rules += [r() for r in RULE_SETS["last-logits"]] if last_logits else []
    if has_zero_point_weights(model)[0]:  # imported AWQ / asymmetric GPTQ linears
        rules += [r() for r in RULE_SETS["trt-symmetric-weights"]]
    if not rules and keep_input:
        return LoweredModel(model_path, {"applied": {}, "declined": {}}, op_histogram(model), choice)
    total = sum(n.domain == "qwen3_compile" for n in model.graph.node)
    del model
    try:
        graph = rewrite_file(model_path, rules, scratch, symlink_ok=keep_input, what=f"{choice.lowering} MoE")
    except CheckFailedError as err:
        raise CheckFailedError(
            err.problem, file=err.file, fix=f"{err.fix} --moe-lowering dense avoids the MoE rules."
        ) from None
    if choice.lowering in ("none", "dense"):
        moe = choice
    else:  # the lowering's own rule (not the dense fallback): why it declined each MoE node
        declines = graph.report.declined_nodes.get(RULE_SETS[RULE_SET[choice.lowering]][0].name, {})
        moe = _effective(choice, declines, total)
    return LoweredModel(graph.path, graph.report.to_dict(), graph.op_histogram, moe)


def check_requested_lowering(lowered: LoweredModel, requested: str | None) -> None:
    """A lowering asked for with --moe-lowering must be what the graph got (no silent dense fallback)."""
    if requested and lowered.moe.lowering not in (requested, "none"):
        raise BadInputError(
            f"--moe-lowering {requested}: {lowered.moe.skipped[requested]}.",
            field="--moe-lowering",
            fix="leave --moe-lowering out to use the target's order (dense where nothing else fits).",
        )
