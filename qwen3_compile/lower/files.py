"""Rewrite an ONNX file into another folder without copying its weights through memory: the source's
external data files are linked (or copied) beside the new graph, rules read them memory-mapped, and the
weights a rule creates go to one new data file."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from qwen3_compile.errors import CheckFailedError
from qwen3_compile.lower.rules import RewriteReport, RewriteRule, apply_rules
from qwen3_compile.storage.artifact_dir import load_graph, save_onnx
from qwen3_compile.storage.external_data import ExternalDataWriter

NEW_WEIGHTS_FILE = "model.lowered.data"


@dataclass(frozen=True)
class RewrittenGraph:
    path: Path
    report: RewriteReport
    op_histogram: dict[str, int]


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _external_files(model: onnx.ModelProto) -> set[str]:
    return {
        e.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def _place(source: Path, dest: Path, symlink_ok: bool) -> None:
    """A hard link where both are on one file system; else a symbolic link (scratch folders that live no
    longer than their input) or a copy (artifact folders, which must not depend on their input's)."""
    try:
        os.link(source, dest)
    except OSError:
        if symlink_ok:
            os.symlink(source.resolve(), dest)
        else:
            shutil.copyfile(source, dest)


def rewrite_file(
    model_path: Path, rules: list[RewriteRule], out_dir: Path, *, symlink_ok: bool = False, what: str = ""
) -> RewrittenGraph:
    """`model_path` rewritten by `rules` as `out_dir/model.onnx` (the source is only read)."""
    model = load_graph(model_path)
    external = _external_files(model)
    for location in sorted(external):
        _place(model_path.parent / location, out_dir / location, symlink_ok)
    if external:  # weights stay on disk; rules read them memory-mapped
        sink = ExternalDataWriter(out_dir / NEW_WEIGHTS_FILE)
        try:
            report = apply_rules(model, rules, out_dir, sink)
        finally:
            sink.close()
        onnx.save_model(model, str(out_dir / "model.onnx"))
    else:
        report = apply_rules(model, rules)
        save_onnx(model, out_dir / "model.onnx")
    try:
        if external:  # onnx's checker refuses linked data files ("symlink/hardlink attack"): check shapes
            onnx.shape_inference.infer_shapes(model, strict_mode=True)
        else:
            onnx.checker.check_model(str(out_dir / "model.onnx"))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise CheckFailedError(
            f"the lowering{' (' + what + ')' if what else ''} produced an invalid graph: {err}",
            file=model_path,
            fix="report this with the artifact's manifest.json.",
        ) from None
    return RewrittenGraph(out_dir / "model.onnx", report, op_histogram(model))
