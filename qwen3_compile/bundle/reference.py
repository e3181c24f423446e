"""What a bundle carries as evidence: the validation report the artifact passed, and the greedy tokens the
validated artifact produces on ONNX Runtime for a fixed smoke prompt, so the device (or a CPU machine) can
check the shipped graph and runner reproduce them.

Validation is required, not run here: it needs the PyTorch reference (the checkpoint or preset the
artifact came from), which `bundle` does not take. `qwen3-compile validate ARTIFACT --reference MODEL`
writes `ARTIFACT/validation/report.json`; a bundle refuses an artifact without a passing one. Export and
quantize write whole new folders, so a report inside an artifact folder belongs to its model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError, CheckFailedError
from qwen3_compile.schema import decode
from qwen3_compile.storage.manifest import sha256_file
from qwen3_compile.storage.manifests import ValidationRecord

REPORT_DIR = "validation"
REPORT_FILES = ("report.json", "report.md")
SMOKE_PROMPT = "Give me a short introduction to large language models."
SMOKE_TOKENS = 16
MODES = {"thinking": True, "non-thinking": False}


def require_validation(artifact: Path, model_sha256: str | None = None) -> ValidationRecord:
    """The artifact's passing validation report (report.json), or a BadInputError/CheckFailedError.
    `model_sha256`: the artifact's model.onnx hash when the caller has it (else computed here if needed)."""
    path = artifact / REPORT_DIR / "report.json"
    fix = (
        f"run `qwen3-compile validate {artifact} --reference MODEL` (MODEL: the checkpoint or preset it was "
        "exported from) and bundle again."
    )
    if not path.is_file():
        raise BadInputError(
            "the artifact has no validation report; a bundle ships only what passed validation.",
            file=path,
            fix=fix,
        )
    try:
        report = decode(ValidationRecord, json.loads(path.read_text()), file=path)
    except json.JSONDecodeError as err:
        raise BadInputError(f"the report is not valid JSON ({err.msg}).", file=path, fix=fix) from None
    recorded = report.model_sha256
    if recorded and model_sha256 is None and (artifact / "model.onnx").is_file():
        model_sha256 = sha256_file(artifact / "model.onnx")
    if recorded and model_sha256 is not None and model_sha256 != recorded:
        raise BadInputError(
            "the validation report was made for a different model.onnx (sha256 differs).",
            file=path,
            field="model_sha256",
            fix=fix,
        )
    if not report.passed:
        failures = "; ".join(report.failures or ["no verdict recorded"])
        raise CheckFailedError(
            f"the artifact failed validation ({failures}); a bundle ships only what passed.",
            file=path,
            field="passed",
            fix="quantize with a gentler recipe (or fix the artifact) and validate again.",
        )
    return report


def validation_record(report: ValidationRecord) -> dict[str, Any]:
    """What the bundle manifest keeps of the report (the full report ships in validation/)."""
    return {
        "passed": report.passed,
        "backend": report.backend,
        "reference": report.reference,
        "modes": list(report.modes),
        "gates": report.gates,
        "gates_source": report.gates_source,
        "summary": report.summary,
        "cases": len(report.cases),
    }


def smoke_reference(
    artifact: Path, manifest: dict[str, Any], steps: int = SMOKE_TOKENS, model_sha256: str | None = None
) -> dict[str, Any]:
    """Greedy tokens of the validated artifact (its canonical graph, the one validation measured) on ONNX
    Runtime CPU for SMOKE_PROMPT in both reasoning modes, ending after the first stop token.
    `model_sha256`: the artifact's model.onnx hash when the caller has it (else computed here)."""
    from qwen3_compile.backends.base import generate, left_padded_batch
    from qwen3_compile.backends.registry import open_runner
    from qwen3_compile.storage.manifest import tool_versions
    from qwen3_compile.tokenizer import ENDOFTEXT_ID, STOP_IDS, load_tokenizer, render_chat

    runner = open_runner(artifact, manifest, "ort")
    tokenizer = load_tokenizer(artifact)
    modes = {}
    for mode, thinking in MODES.items():
        ids = render_chat(tokenizer, [{"role": "user", "content": SMOKE_PROMPT}], thinking)
        out = generate(runner, left_padded_batch([ids], ENDOFTEXT_ID), steps)
        tokens = [int(t) for t in out.tokens[0]]
        stop = next((i for i, t in enumerate(tokens) if t in STOP_IDS), None)
        modes[mode] = {"prompt_ids": ids, "tokens": tokens if stop is None else tokens[: stop + 1]}
    model_sha256 = model_sha256 or sha256_file(artifact / "model.onnx")
    return {
        "prompt": SMOKE_PROMPT,
        "max_new_tokens": steps,
        "decoding": "greedy",
        "source": f"the artifact's model.onnx (sha256 {model_sha256[:16]}...) on "
        f"onnxruntime {tool_versions().get('onnxruntime', '?')} CPU",
        "modes": modes,
    }
