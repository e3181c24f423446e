"""What `build` accepts: a canonical export (fp32/fp16/bf16) or a quantized artifact, checked against the
target before any work (recipe/target compatibility, e.g. FP8 on Jetson Orin, is an error up front)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen3_compile.errors import BadInputError
from qwen3_compile.lower.trt_zero_points import has_zero_point_weights
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.quantized.config import deployed_precision
from qwen3_compile.quantize.compat import check_recipe_target, sm_tuple
from qwen3_compile.quantize.recipe import QuantRecipe
from qwen3_compile.storage.artifact_dir import load_graph
from qwen3_compile.storage.manifest import MANIFEST, read_manifest, verify_outputs
from qwen3_compile.storage.manifests import ExportManifest, LowerManifest, QuantizeManifest
from qwen3_compile.targets import Target

MODEL_FILE = "model.onnx"
BUILDABLE_STAGES = ("export", "quantize")


@dataclass(frozen=True)
class BuildInput:
    directory: Path
    manifest: ExportManifest | QuantizeManifest
    arch: Qwen3Arch
    dtype: str  # the export's float type: fp32, fp16, bf16
    recipe: QuantRecipe | None

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def label(self) -> str:
        return self.recipe.name if self.recipe is not None else f"{self.dtype} export"


def read_build_input(artifact: str | Path) -> BuildInput:
    directory = Path(artifact)
    manifest = read_manifest(directory)
    where = directory / MANIFEST
    stage = manifest.stage
    if isinstance(manifest, LowerManifest):
        source = manifest.inputs.artifact
        raise BadInputError(
            "build lowers the canonical graph for its target itself; this folder is already lowered.",
            file=where,
            field="stage",
            fix=f"build the folder it was lowered from ({source}).",
        )
    if stage not in BUILDABLE_STAGES:
        raise BadInputError(
            f"build takes an exported or quantized artifact; this is a '{stage}' artifact.",
            file=where,
            field="stage",
            fix="run `qwen3-compile export MODEL -o DIR` (then optionally `quantize`) and build that folder.",
        )
    verify_outputs(directory, manifest, (MODEL_FILE,))
    arch = Qwen3Arch.from_hf_dict(manifest.architecture, source=where)
    recipe = None
    if isinstance(manifest, QuantizeManifest):
        recipe = QuantRecipe.from_dict(manifest.recipe, source=f"{where} (recipe)")
    return BuildInput(directory, manifest, arch, manifest.options.dtype, recipe)


def check_target_supports(build_input: BuildInput, target: Target) -> None:
    """Recipe/target (or export dtype/target) mismatch -> BadInputError before any work."""
    if build_input.recipe is not None:
        check_recipe_target(build_input.recipe, target)
        _check_int4_experts(build_input, target)
        return
    _check_imported(build_input, target)
    if build_input.dtype == "bf16" and sm_tuple(target.sm) < (8, 0):
        raise BadInputError(
            f"bf16 needs SM >= 8.0; {target.name} is SM {target.sm}.",
            file=build_input.directory / MANIFEST,
            field="options.dtype",
            fix="export with --dtype fp16.",
        )


EXPERT_TENSORS = ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")


def int4_experts(build_input: BuildInput) -> bool:
    """Whether the artifact's MoE experts are INT4 (an INT4 recipe that selects them)."""
    recipe = build_input.recipe
    if recipe is None or recipe.weights.dtype != "int4" or not build_input.arch.num_experts:
        return False
    return any(recipe.select.selects(name) for name in EXPERT_TENSORS)


def int4_experts_refusal(arch: Qwen3Arch, export_dtype: str, group: int | None, target: Target) -> str | None:
    """Why `target`'s engines cannot take INT4 experts of this model (None: they can, through the qmoe
    plugin): the target must use the plugin, and the kernels need fp16 activations (the scales of an fp16
    export), their shapes and groups (plugins/moe/qmoe.h)."""
    from qwen3_compile.kernels import trt_contract as contract

    if "plugin" not in target.moe_lowerings:
        return f"target {target.name} does not use the qmoe plugin"
    if export_dtype != "fp16":
        return f"the plugin takes INT4 experts of an fp16 export (fp16 scales); this is {export_dtype}"
    try:
        contract.check_shapes(arch.num_experts, arch.hidden_size, arch.moe_intermediate_size, arch.top_k)
    except ValueError as err:
        return str(err)
    widths = (arch.hidden_size, arch.moe_intermediate_size)
    if group not in contract.INT4_GROUP_SIZES or any(width % group for width in widths):
        return f"INT4 group size {group}: the kernels take {contract.INT4_GROUP_SIZES} dividing H and I"
    return None


def _check_int4_experts(build_input: BuildInput, target: Target) -> None:
    """INT4 experts have one TensorRT path: the qmoe plugin (kINT4 inputs, lower/trt_plugin_moe.py). The dense
    lowering is no path: TensorRT-RTX 1.7.1's builder dies with a segmentation fault (the process, no error)
    on INT4 experts lowered densely. So INT4 experts build only where the target uses the plugin and the
    kernels take them; otherwise refused here, before any work, instead of crashing the build (and the build
    stage refuses again if the plugin did not take every MoE node)."""
    if not int4_experts(build_input):
        return
    arch, recipe = build_input.arch, build_input.recipe
    why = int4_experts_refusal(arch, build_input.dtype, recipe.weights.group_size, target)
    if why is None:
        return
    raise BadInputError(
        f"recipe '{build_input.recipe.name}' quantized the MoE experts to INT4, which TensorRT engines take "
        f"only through the qmoe plugin: {why} (the dense lowering is no alternative: TensorRT-RTX 1.7.1 "
        "crashes building INT4 experts).",
        file=build_input.directory / MANIFEST,
        field="recipe.weights.dtype",
        fix="run this artifact on ONNX Runtime (`validate`, `run`), or quantize with INT4 for the dense "
        "layers only (add '\\.mlp\\.experts\\.' to the recipe's [select] skip) or with int8-wo for TensorRT.",
    )


def _check_imported(build_input: BuildInput, target: Target) -> None:
    """An imported quantized checkpoint (FP8, AWQ, GPTQ) keeps its own weights; TensorRT must take them as
    they are. Its DequantizeLinear takes signed INT4/INT8 and E4M3 with no zero point: asymmetric linears
    (AWQ, GPTQ with zero points) are rewritten exactly into that form (lower/trt_zero_points.py), asymmetric
    MoE experts cannot be; and the target must have the checkpoint's precision."""
    imported = getattr(build_input.manifest, "imported", None)
    if not imported:
        return
    where, label = build_input.directory / MANIFEST, imported.get("label", imported.get("method"))
    if has_zero_point_weights(load_graph(build_input.model_path))[1]:
        raise BadInputError(
            f"this artifact keeps an asymmetric checkpoint's MoE experts ({label}, with zero points); "
            "TensorRT takes symmetric INT4/INT8 experts only (asymmetric linears outside the experts are "
            "rewritten).",
            file=where,
            field="imported.sym",
            fix="run it on ONNX Runtime (`lower --for ort`, `validate`, `run`), or export a symmetric "
            "checkpoint (GPTQ with sym=true) or the float model for `quantize` instead.",
        )
    precision = deployed_precision(imported.get("method"), imported.get("bits"))
    if precision not in target.precisions:
        raise BadInputError(
            f"this artifact keeps {label} weights; {target.name} has no {precision} "
            f"(its precisions: {', '.join(target.precisions)}).",
            file=where,
            field="imported.method",
            fix="build for a target with that precision, or export the float model and `quantize` it with a "
            f"recipe {target.name} runs.",
        )
