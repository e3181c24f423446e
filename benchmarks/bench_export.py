"""Export and ONNX Runtime CPU benchmark: our exporter against optimum-onnx and PyTorch eager, one run.

    python3 benchmarks/bench_export.py [--models tiny-moe,tiny-dense] [--slice-30b] [--no-optimum]

For each model: export wall time and peak RSS (each export in its own process), graph size, ONNX Runtime
prefill latency (128 tokens, batch 1, median of 5) and greedy decode throughput (64 tokens, batch 1, KV
cache) of our ORT-lowered graph, our canonical graph, optimum-onnx's export of the same checkpoint, and
transformers in eager mode. Every runner goes through the same driver (qwen3_compile.runtime), so the
numbers differ only by the graph. optimum-onnx needs transformers < 4.58, so the script installs it into
its own virtual environment (benchmarks/.venv-optimum, from the package index) on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OPTIMUM_VENV = HERE / ".venv-optimum"
OPTIMUM_REQS = ["torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0", "transformers>=4.57,<4.58"]

# Prepended to every child's code (here, bench_quantize, bench_build, bench_bundle, bench_quantize_scale,
# bench_scale): the child's own peak RSS. VmHWM belongs to the address space, which exec replaces;
# resource.getrusage's ru_maxrss does not restart at exec, so a child started from a parent holding N MB
# reports at least N MB.
CHILD_PRELUDE = """
def peak_rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
"""

# Runs in a child process: export and report the child's own peak RSS.
_OURS = """
import json, sys, time
from qwen3_compile.export.stage import export_onnx
from qwen3_compile.lower.stage import lower_artifact
start = time.perf_counter()
model, out, target, layers = sys.argv[1:5]
canonical = out + "-canonical" if target else out
export_onnx(model, canonical, num_layers=int(layers) or None)
if target:  # the two stages a user runs: export, then lower (timed and measured together)
    lower_artifact(canonical, out, target)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": peak_rss_mb()}))
"""
_OPTIMUM = """
import json, sys, time
from optimum.exporters.onnx import main_export
start = time.perf_counter()
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", device="cpu")
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def _run_child(python: str, code: str, *args: str) -> dict:
    """Run `code` (which may call peak_rss_mb()) in a child; its last stdout line, parsed as JSON."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [python, "-c", CHILD_PRELUDE + code, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_optimum_env() -> str:
    python = OPTIMUM_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OPTIMUM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *OPTIMUM_REQS], check=True)
    return str(python)


def save_checkpoint(model: str, layers: int | None, folder: Path) -> None:
    """A save_pretrained checkpoint with a config both transformers 4.x and 5.x read correctly."""
    from qwen3_compile.models.loading import load_model

    loaded = load_model(model, num_layers=layers)
    loaded.model.save_pretrained(folder)
    config = loaded.arch.to_hf_dict() | {"torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def time_runner(runner, prompt_len: int = 128, decode: int = 64, repeats: int = 5) -> dict:
    """Median prefill latency, and greedy decode throughput timed over the decode steps alone."""
    from qwen3_compile.backends.base import left_padded_batch

    rng = np.random.default_rng(0)
    batch = left_padded_batch([rng.integers(0, 151643, prompt_len).tolist()], 0)
    prefill, rates = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        logits, cache = runner.forward(
            batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(1)
        )
        prefill.append(time.perf_counter() - start)
        mask, position = batch.attention_mask, batch.position_ids[:, -1:]
        start = time.perf_counter()
        for _ in range(decode):
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            position = position + 1
            logits, cache = runner.forward(token, mask, position, cache)
        rates.append(decode / (time.perf_counter() - start))
    return {"prefill_ms": 1000 * statistics.median(prefill), "decode_tok_s": statistics.median(rates)}


def graph_stats(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    size = sum(p.stat().st_size for p in path.parent.glob("model.onnx*"))
    return {"nodes": len(model.graph.node), "file_mb": size / 1e6}


def bench_model(model: str, layers: int | None, use_optimum: bool, work: Path) -> list[dict]:
    from qwen3_compile.backends.onnxruntime.runner import OrtRunner
    from qwen3_compile.backends.registry import open_runner
    from qwen3_compile.backends.torch_reference import TorchRunner
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.storage.manifest import read_manifest

    label = model if layers is None else f"{model} ({layers} layers)"
    rows = []
    pipelines = (("ort", "qwen3-compile (export + lower --for ort)"), ("", "qwen3-compile (canonical)"))
    for target, name in pipelines:
        out = work / f"ours-{target or 'canonical'}"
        export = _run_child(sys.executable, _OURS, model, str(out), target, str(layers or 0))
        row = {"model": label, "pipeline": name, **export}
        if "error" not in export:
            runner = open_runner(out, read_manifest(out))  # as validate and run open it
            row |= graph_stats(out / "model.onnx") | time_runner(runner)
        rows.append(row)
    if use_optimum:
        ckpt = work / "checkpoint"
        save_checkpoint(model, layers, ckpt)
        out = work / "optimum"
        export = _run_child(ensure_optimum_env(), _OPTIMUM, str(ckpt), str(out))
        row = {"model": label, "pipeline": "optimum-onnx 0.1.0", **export}
        if "error" not in export:
            row |= graph_stats(out / "model.onnx") | time_runner(OrtRunner(out / "model.onnx"))
        rows.append(row)
    rows.append(
        {
            "model": label,
            "pipeline": "PyTorch eager (transformers)",
            **time_runner(TorchRunner(load_model(model, num_layers=layers))),
        }
    )
    return rows


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> a markdown table; columns are (header, row key, format); missing values print as '-'."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = ["-" if key not in r else format(r[key], fmt) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


EXPORT_COLUMNS = [
    ("model", "model", "s"),
    ("pipeline", "label", "s"),
    ("export s", "seconds", ".1f"),
    ("export peak RSS MB", "peak_rss_mb", ".0f"),
    ("nodes", "nodes", "d"),
    ("file MB", "file_mb", ".1f"),
    ("prefill 128 ms", "prefill_ms", ".1f"),
    ("decode tok/s", "decode_tok_s", ".1f"),
]


def to_markdown(rows: list[dict]) -> str:
    labelled = [
        r | {"label": r["pipeline"] + (f" (failed: {r['error']})" if "error" in r else "")} for r in rows
    ]
    return markdown_table(labelled, EXPORT_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny-moe,tiny-dense")
    parser.add_argument("--slice-30b", action="store_true", help="also a 2-layer real-width Qwen3-30B-A3B")
    parser.add_argument("--no-optimum", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    jobs = [(m, None) for m in args.models.split(",") if m]
    if args.slice_30b:
        jobs.append(("qwen3-30b-a3b", 2))
    rows = []
    for model, layers in jobs:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_model(model, layers, not args.no_optimum, Path(tmp))
        print(to_markdown(rows[-4:]), flush=True)
    print("\n" + to_markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
