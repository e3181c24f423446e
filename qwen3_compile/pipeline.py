"""`compile`: the whole pipeline on one model. Today: export -> lowering for ONNX Runtime (`lower`) ->
parity of both graphs against PyTorch -> full validation of the ORT graph (prompt suite in both reasoning
modes, long context, layer bisection) -> SmoothQuant W8A8 (`int8-sq`, calibrated layer by layer)
validated against its recipe's gates -> a TensorRT-RTX engine of the canonical graph when TensorRT-RTX is
installed (skipped with the reason otherwise)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen3_compile.backends.onnxruntime.loader import load_ort_runner
from qwen3_compile.backends.torch_reference import TorchRunner
from qwen3_compile.environment import environment
from qwen3_compile.export.stage import ExportedArtifact, ExportOptions, export_onnx
from qwen3_compile.lower.stage import LoweredArtifact, lower_artifact
from qwen3_compile.models.loading import load_model
from qwen3_compile.parity import ParityGates, ParityReport, check_parity, parity_prompts
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.quantize.stage import QuantizedArtifact, quantize_artifact
from qwen3_compile.schema import encode
from qwen3_compile.targets import Target, all_targets, get_target
from qwen3_compile.tokenizer import load_tokenizer
from qwen3_compile.validate.stage import ValidationReport, validate_artifact


@dataclass(frozen=True)
class CompileResult:
    directory: Path
    artifacts: dict[str, ExportedArtifact | LoweredArtifact]  # "canonical", "ort"
    parity: dict[str, ParityReport]
    validation: ValidationReport
    # the MAIN_RECIPE step; None for a published quantized checkpoint (never quantized twice)
    quantized: QuantizedArtifact | None
    quantized_validation: ValidationReport | None
    engine: dict  # {"path", "target", "bytes", "build_s", "moe_lowering"} or {"skipped": why}

    @property
    def passed(self) -> bool:
        quantized_ok = self.quantized_validation is None or self.quantized_validation.passed
        return all(p.passed for p in self.parity.values()) and self.validation.passed and quantized_ok

    def to_dict(self) -> dict:
        return {
            "directory": str(self.directory),
            "passed": self.passed,
            "artifacts": {
                k: {"path": str(a.model_path), "op_histogram": a.op_histogram, "lowering": _lowering(a)}
                for k, a in self.artifacts.items()
            },
            "parity": {k: p.to_dict() for k, p in self.parity.items()},
            "validation": {
                "passed": self.validation.passed,
                "failures": self.validation.failures,
                "report": str(self.validation.directory / "report.md"),
            },
            "quantized": None
            if self.quantized is None
            else {
                "path": str(self.quantized.directory / "model.onnx"),
                "recipe": self.quantized.recipe.name,
                "weight_ratio_vs_fp16": self.quantized.weight_ratio,
                "calibration": self.quantized.manifest.calibration,
                "validation": {
                    "passed": self.quantized_validation.passed,
                    "failures": self.quantized_validation.failures,
                    "gates": self.quantized_validation.gates_source,
                    "prefill": self.quantized_validation.summary("prefill").to_dict(),
                    "report": str(self.quantized_validation.directory / "report.md"),
                },
            },
            "engine": self.engine,
            "environment": environment(),
        }


def compile_model(
    model: str,
    output_root: str | Path = "artifacts",
    *,
    num_layers: int | None = None,
    decode_steps: int = 32,
    long_context_tokens: int | None = None,
    progress: Progress = NO_PROGRESS,
) -> CompileResult:
    """Run the pipeline into `output_root`/<model name>/ (replacing an earlier run there)."""
    name = Path(model).name if Path(model).exists() else model
    run_dir = Path(output_root) / (name if num_layers is None else f"{name}-{num_layers}l")
    loaded = load_model(model, num_layers=num_layers, progress=progress)
    # a published quantized checkpoint exports its stored weights from the folder (the loaded model holds
    # their dequantization: the reference); it is not quantized again below
    imported = loaded.source.quantization is not None
    canonical = export_onnx(
        loaded.source if imported else loaded,
        run_dir / "onnx",
        ExportOptions(),
        force=True,
        progress=progress,
    )
    artifacts = {
        "canonical": canonical,
        "ort": lower_artifact(
            canonical.directory, run_dir / "onnx-ort", "ort", force=True, progress=progress
        ),
    }
    tokenizer = load_tokenizer(loaded.source.tokenizer_dir)
    prompts, modes = parity_prompts(tokenizer)
    reference = TorchRunner(loaded)
    parity = {}
    with progress.stage("parity vs PyTorch", total=len(artifacts), unit="graphs") as advance:
        for key, artifact in artifacts.items():
            parity[key] = check_parity(
                reference,
                load_ort_runner(artifact.directory, artifact.manifest),  # as its manifest says
                prompts,
                modes,
                decode_steps,
                ParityGates.for_dtype(canonical.options.dtype),
            )
            advance(1)
    validation = validate_artifact(
        artifacts["ort"].directory, loaded, output=run_dir / "validation", progress=progress
    )
    quantized = quantized_validation = None
    if not imported:
        quantized = quantize_artifact(
            artifacts["canonical"].directory,
            MAIN_RECIPE,
            run_dir / MAIN_RECIPE,
            force=True,
            progress=progress,
        )
        quantized_validation = validate_artifact(
            quantized.directory,
            loaded,
            output=run_dir / f"validation-{MAIN_RECIPE}",
            long_context_tokens=0,  # the long context was checked on the float graph above
            bisect=False,
            progress=progress,
        )
    engine = _build_engine(artifacts, run_dir, progress)
    result = CompileResult(run_dir, artifacts, parity, validation, quantized, quantized_validation, engine)
    (run_dir / "compile.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


MAIN_RECIPE = "int8-sq"  # the recipe that exercises the most: calibration, SmoothQuant, W8A8 experts
ENGINE_TARGET = "rtx-blackwell"  # TensorRT-RTX builds it on any machine, no GPU needed


def _lowering(artifact: ExportedArtifact | LoweredArtifact) -> dict | None:
    return encode(artifact.report) if isinstance(artifact, LoweredArtifact) else None


def _build_engine(
    artifacts: dict[str, ExportedArtifact | LoweredArtifact], run_dir: Path, progress: Progress
) -> dict:
    return build_engine_if_installed(
        artifacts["canonical"].directory, get_target(ENGINE_TARGET), run_dir, progress
    )


def build_engine_if_installed(artifact: Path, target: Target, run_dir: Path, progress: Progress) -> dict:
    """A plan for `target` into run_dir/engine-<target> when its TensorRT flavour is installed: a record
    of the build (built, not executed), or {"skipped": why}."""
    from qwen3_compile.backends.tensorrt.shim import flavour

    engine_flavour = flavour(target.tensorrt)
    if not engine_flavour.available():
        return {
            "skipped": f"{target.tensorrt} is not installed (python module '{engine_flavour.module}' not "
            f"found; {engine_flavour.install}); no engine was built"
        }
    if all_targets().get(target.name) != target:
        return {"skipped": f"{target.name} is not one of recipes/targets/*.toml; no engine was built"}
    from qwen3_compile.engine import BuildOptions, build_engine

    built = build_engine(
        artifact, BuildOptions(target.name), run_dir / f"engine-{target.name}", force=True, progress=progress
    )
    return {
        "path": str(built.plan_path),
        "target": target.name,
        "bytes": built.plan_bytes,
        "build_s": built.build_seconds,
        "moe_lowering": built.moe_lowering,
        "note": "built, not executed",
    }
