"""validate-tiny, validate-slice, validate-matrix and torch-floor: `validate --backend ort-cuda` of the
exports, every MoE path, and PyTorch's own half precision held to the same check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ort_cuda_parts.artifacts import ARTIFACTS, MODELS, SLICE
from ort_cuda_parts.results import Results, guarded, log

REPO = Path(__file__).resolve().parents[2]


def validate_tiny(work: Path, results: Results, out: Path, artifacts: list[str]) -> None:
    """The CLI, as a user runs it, several at once (3 CPU threads each for the PyTorch reference). They
    run in this checkout (`python -m` puts the working directory first on the path)."""
    procs = {}
    env = os.environ | {"OMP_NUM_THREADS": "3"}
    for name in artifacts:
        spec = ARTIFACTS[name]
        cmd = [sys.executable, "-m", "qwen3_compile.cli", "validate", str(work / name), "--reference"]
        cmd += [spec.preset, "--backend", "ort-cuda", "--json", "--force"]
        cmd += ["-o", str(work / f"validation-{name}")]
        log("launch", " ".join(cmd))
        procs[name] = (
            cmd,
            time.perf_counter(),
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
    for name, (cmd, start, proc) in procs.items():
        stdout, stderr = proc.communicate()
        entry = {
            "command": " ".join(cmd).replace(str(work), "W"),
            "exit_code": proc.returncode,
            "seconds": round(time.perf_counter() - start, 1),
        }
        try:
            report = json.loads(stdout)
            entry |= {k: report[k] for k in ("passed", "failures", "summary", "gates", "backend_settings")}
            entry["bisection"] = report.get("bisection")
        except Exception:
            entry["stdout"] = stdout[-2000:]
        entry["stderr_tail"] = stderr[-1500:]
        results.put(["validate", name], entry)
        log("validate", name, entry["exit_code"], entry.get("passed"))
    cmd = [sys.executable, "-m", "qwen3_compile.cli", "run", str(work / "tiny-moe-fp16"), "--prompt"]
    cmd += ["Explain in two sentences why the sky is blue.", "--backend", "ort-cuda", "--greedy"]
    cmd += ["--max-new-tokens", "64", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    entry = {"command": " ".join(cmd).replace(str(work), "W"), "exit_code": proc.returncode}
    try:
        entry |= {k: v for k, v in json.loads(proc.stdout).items() if k not in ("reasoning", "content")}
    except Exception:
        entry["stdout"] = proc.stdout[-1500:]
    entry["stderr_tail"] = proc.stderr[-1500:]
    results.put(["run-cli", "tiny-moe-fp16"], entry)


def validation_report(work: Path, name: str, loaded, long_tokens: int, output: Path) -> dict:
    """`validate --backend ort-cuda` of one prepared artifact against `loaded`, as the report's dict."""
    from qwen3_compile.validate.stage import validate_artifact

    report = validate_artifact(
        work / name,
        loaded,
        backend="ort-cuda",
        long_context_tokens=long_tokens,
        output=output,
        force=True,  # a re-measure replaces the earlier report
    )
    return report.to_dict()


def validate_one(work: Path, name: str, loaded, long_tokens: int) -> dict:
    data = validation_report(work, name, loaded, long_tokens, work / f"validation-{name}")
    return {k: data[k] for k in ("passed", "failures", "summary", "gates", "backend_settings", "bisection")}


def validate_slice(work: Path, results: Results, artifacts: list[str], long_tokens: int) -> None:
    from qwen3_compile.models.loading import load_model

    loaded = load_model(SLICE, num_layers=2)
    for name in artifacts:
        guarded(results, ["validate", name], validate_one, work, name, loaded, long_tokens)


def matrix_paths(name: str, ort_ops: Path | None) -> list[tuple[str, Path | None]]:
    """How `validate-matrix` runs an artifact: (label, custom-op library or None). A MoE graph that keeps
    ExpertDispatch runs twice: ORT's inlined function body (dense experts) and our custom op."""
    spec = ARTIFACTS[name]
    if spec.lowered_from is not None:
        return [(spec.moe_lowering or "lowered", None)]
    if "moe" in spec.preset or spec.preset == SLICE:
        return [("body", None)] + ([("custom-op", ort_ops)] if ort_ops is not None else [])
    return [("dense", None)]


def validate_matrix(
    work: Path, results: Results, artifacts: list[str], ort_ops: Path | None, long_tokens: int
):
    """GPU parity: `validate --backend ort-cuda --reference-device cuda` (the fp32 PyTorch reference on the
    same GPU, TF32 off; each model's reference loaded once, its greedy runs reused across artifacts) of every
    artifact through each of its MoE paths, the dtype's default gates, both reasoning modes."""
    import torch

    from qwen3_compile.backends.onnxruntime.op_libraries import selected_custom_ops
    from qwen3_compile.backends.torch_reference import require_reference_device
    from qwen3_compile.models.loading import load_model

    require_reference_device("cuda")
    for model in dict.fromkeys(ARTIFACTS[a].model for a in artifacts):
        preset, layers = MODELS[model]
        start = time.perf_counter()
        loaded = load_model(preset, num_layers=layers, device="cuda")
        log("reference on cuda", model, round(time.perf_counter() - start, 1))
        for name in [a for a in artifacts if ARTIFACTS[a].model == model]:
            for label, ops in matrix_paths(name, ort_ops):

                def one(name=name, label=label, ops=ops, loaded=loaded) -> dict:
                    began = time.perf_counter()
                    with selected_custom_ops(ops, "ort-cuda"):
                        output = work / f"validation-{name}-{label}"
                        data = validation_report(work, name, loaded, long_tokens, output)
                    keep = (
                        "passed",
                        "failures",
                        "summary",
                        "gates",
                        "reference_device",
                        "modes",
                        "bisection",
                    )
                    return {k: data[k] for k in keep} | {
                        "seconds": round(time.perf_counter() - began, 1),
                        "custom_ops": data["backend_settings"].get("custom_ops"),
                    }

                guarded(results, ["validate-matrix", name, label], one)
                log(
                    "validate-matrix", name, label, results.data["validate-matrix"][name][label].get("passed")
                )
        del loaded
        torch.cuda.empty_cache()


def torch_floor(results: Results, models: list[str], long_tokens: int, steps: int = 16) -> None:
    """torch-floor part: PyTorch's own fp16 and bf16 models on the GPU held to what validate holds an
    artifact to (the same prompt suite in both modes, the long-context case, metrics and default gates of
    the dtype) against the same fp32 reference on the GPU: the floor a framework's own half-precision run
    sets, beside the artifacts' rows of validate-matrix. Uses validate's own case runner and gate check."""
    import dataclasses

    import torch

    from qwen3_compile.backends.torch_reference import TorchRunner, require_reference_device
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.tokenizer import load_tokenizer
    from qwen3_compile.validate.gates import DEFAULT_GATES
    from qwen3_compile.validate.prompt_suite import load_prompt_entries, long_context_case, render_suite
    from qwen3_compile.validate.stage import ValidationReport, _evaluate, _run_case

    require_reference_device("cuda")
    tokenizer = load_tokenizer()
    cases = render_suite(tokenizer, load_prompt_entries(None)) + [long_context_case(tokenizer, long_tokens)]
    for model in models:
        preset, layers = MODELS[model]
        reference = TorchRunner(load_model(preset, num_layers=layers, device="cuda"))
        for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):

            def one(dtype=dtype, torch_dtype=torch_dtype, preset=preset, layers=layers, reference=reference):
                low = load_model(preset, num_layers=layers, dtype=torch_dtype, device="cuda")
                ran = [_run_case(reference, TorchRunner(low), case, steps) for case in cases]
                report = ValidationReport(
                    f"pytorch-{dtype}", preset, "pytorch-cuda", DEFAULT_GATES[dtype], "defaults", ran, None
                )
                report = dataclasses.replace(report, failures=_evaluate(report))
                data = report.to_dict()
                del low
                torch.cuda.empty_cache()
                return {k: data[k] for k in ("passed", "failures", "summary", "gates", "modes")}

            guarded(results, ["torch-floor", model, dtype], one)
        del reference
        torch.cuda.empty_cache()
