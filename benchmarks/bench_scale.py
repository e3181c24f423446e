"""Scale benchmark (issue #9): export of synthetic checkpoints with Qwen3-30B-A3B layer shapes at
growing depth, one child process per run (wall time and the child's peak RSS from wait4), against plain
`torch.onnx.export` of the same model where that fits in memory.

    python3 benchmarks/bench_scale.py [--layers 2,8,16,24] [--wide-layers 2] [--torch-layers 2]

Each checkpoint is written (random bf16 weights, one shard per layer, per-expert tensors as the
published checkpoints store them), exported with `--dtype bf16`, measured and deleted before the next.
A run whose checkpoint plus export would not fit in `--max-disk-gb` (or the free disk less 15 GB left to
other jobs) gets a sparse checkpoint: all-zero weights stored as file holes. The exporter reads, checks
and writes every byte as usual, so memory is measured the same, but the reads come from no disk (such
rows are marked). `--wide-layers` adds a Qwen3-235B-A22B-shaped run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_export import CHILD_PRELUDE, markdown_table  # noqa: E402

GB = 1e9
TORCH = "torch.onnx.export (dynamo)"

_OURS = """
import json, sys, time
from qwen3_compile.export.stage import ExportOptions, export_onnx
from qwen3_compile.progress import LineProgress
start = time.perf_counter()
artifact = export_onnx(sys.argv[1], sys.argv[2], ExportOptions(dtype=sys.argv[3]), progress=LineProgress())
print(json.dumps({"seconds": time.perf_counter() - start, "timings": artifact.manifest.timings_s,
                  "vm_hwm_mb": peak_rss_mb()}))
"""
# plain torch.onnx.export (dynamo, transformers' batched_mm experts: the grouped_mm and eager expert
# implementations do not export) of the model transformers loads from the same checkpoint
_TORCH = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
for module in model.modules():
    if hasattr(module, "config"):
        module.config._experts_implementation = "batched_mm"
class Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask, use_cache=False).logits
ids = torch.randint(0, 151643, (1, 8))
torch.onnx.export(Logits(model).eval(), (ids, torch.ones_like(ids)), sys.argv[2] + "/model.onnx",
                  dynamo=True, external_data=True)
print(json.dumps({"seconds": time.perf_counter() - start, "vm_hwm_mb": peak_rss_mb()}))
"""
_WRITE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bench_scale import write_checkpoint
from qwen3_compile.models.presets import get_preset
arch = get_preset(sys.argv[2], int(sys.argv[3])).arch
written = write_checkpoint(arch, __import__("pathlib").Path(sys.argv[4]), sys.argv[5] == "1")
print(json.dumps({"bytes": written}))
"""


def run_child(code: str, *args: str, log: Path) -> dict:
    """Run `code` in a child; wall time, its peak RSS (wait4's ru_maxrss) and its JSON result. Its stderr
    (progress lines) goes to `log`."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(HERE.parent))
    start = time.perf_counter()
    with log.open("w") as err, log.with_suffix(".out").open("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_PRELUDE + code, *args], stdout=out, stderr=err, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    result: dict = {"wall_s": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}
    if proc.returncode != 0:
        last = (log.read_text().strip().splitlines() or ["failed"])[-1][:200]
        result["error"] = f"exit {proc.returncode}: {last}"
        return result
    result.update(json.loads(stdout.strip().splitlines()[-1]))
    return result


def tensor_specs(arch) -> list[tuple[str, str, tuple[int, ...]]]:
    """(shard, name, shape) of every checkpoint tensor, per-expert layout, one shard per layer."""
    from qwen3_compile.models.tensors import ExpertLayout, expected_shapes

    specs = []
    for name, shape in expected_shapes(arch, ExpertLayout.PER_EXPERT).items():
        shard = f"layer-{int(name.split('.')[2]):03d}" if ".layers." in name else "rest"
        specs.append((f"model-{shard}.safetensors", name, shape))
    return specs


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], sparse: bool, seed: int) -> int:
    """A bf16 safetensors file written tensor by tensor (random N(0, 0.02) or, sparse, holes)."""
    import torch

    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if sparse:
            f.truncate(8 + len(raw) + offset)
            return offset
        for _, shape in tensors:
            values = torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)
            f.write(values.view(torch.int16).numpy().tobytes())
    return offset


def write_checkpoint(arch, folder: Path, sparse: bool) -> int:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(arch.to_hf_dict() | {"torch_dtype": "bfloat16"}, indent=2))
    shards: dict[str, list] = {}
    for shard, name, shape in tensor_specs(arch):
        shards.setdefault(shard, []).append((name, shape))
    total = sum(
        write_shard(folder / s, t, sparse, seed) for seed, (s, t) in enumerate(sorted(shards.items()))
    )
    weight_map = {name: shard for shard, tensors in shards.items() for name, _ in tensors}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def graph_only_seconds(preset: str, layers: int) -> float:
    """Building every node and initializer description of the model, no weight bytes: what repeating one
    layer's graph could at most save."""
    import torch
    from onnx import TensorProto

    from qwen3_compile.export.graph import build_layered_graph
    from qwen3_compile.models.presets import get_preset

    class Names:
        def emit(self, b, plan, dtype):
            b.add_initializer(TensorProto(name=plan.name, data_type=TensorProto.BFLOAT16, dims=plan.dims))

        def end_group(self):
            pass

    arch = get_preset(preset, layers).arch
    start = time.perf_counter()
    build_layered_graph(arch, Names(), torch.bfloat16)
    return time.perf_counter() - start


def bench_run(
    preset: str, layers: int, work: Path, dtype: str, budget: float, torch_export: bool
) -> list[dict]:
    """One depth: write the checkpoint, export it (and torch.onnx.export it), measure, delete. The parent
    stays small (no torch): a child's ru_maxrss starts from its parent's RSS at fork."""
    from qwen3_compile.models.presets import get_preset
    from qwen3_compile.models.tensors import expected_shapes

    numel = sum(math.prod(shape) for shape in expected_shapes(get_preset(preset, layers).arch).values())
    ckpt_bytes = 2 * numel
    export_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype] * numel
    free = shutil.disk_usage(work).free
    sparse = ckpt_bytes + export_bytes > min(budget, free - 15 * GB)
    if export_bytes > min(budget, free - 15 * GB):
        print(f"skip {preset} x{layers}: the export alone needs {export_bytes / GB:.1f} GB", flush=True)
        return []
    label = f"{preset} ({layers} layers)"
    ckpt, out = work / f"ckpt-{preset}-{layers}", work / f"onnx-{preset}-{layers}"
    print(f"{label}: writing the {'sparse ' if sparse else ''}checkpoint ...", flush=True)
    written = run_child(
        _WRITE, str(HERE), preset, str(layers), str(ckpt), str(int(sparse)), log=work / "write.log"
    )
    if "error" in written:
        raise RuntimeError(f"writing the checkpoint failed: {written['error']}")
    weights = written["bytes"]
    print(f"  {weights / GB:.1f} GB in {written['wall_s']:.0f} s", flush=True)
    rows = []
    try:
        r = run_child(_OURS, str(ckpt), str(out), dtype, log=work / f"{out.name}.log")
        data = out / "model.onnx.data"
        rows.append(
            {
                "model": label,
                "layers": layers,
                "pipeline": "qwen3-compile export" + (" (sparse ckpt)" if sparse else ""),
                "weights_gb": weights / GB,
                "file_gb": data.stat().st_size / GB if data.exists() else float("nan"),
                **r,
            }
        )
        print(f"  ours: {rows[-1]}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if torch_export:
            out.mkdir()
            r = run_child(_TORCH, str(ckpt), str(out), log=work / f"torch-{out.name}.log")
            rows.append(
                {
                    "model": label,
                    "layers": layers,
                    "pipeline": TORCH,
                    "weights_gb": weights / GB,
                    "file_gb": folder_bytes(out) / GB,
                    **r,
                }
            )
            print(f"  torch.onnx.export: {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    return rows


COLUMNS = [
    ("model", "model", "s"),
    ("pipeline", "pipeline", "s"),
    ("weights GB", "weights_gb", ".1f"),
    ("file GB", "file_gb", ".1f"),
    ("export s", "wall_s", ".1f"),
    ("s / GB", "s_per_gb", ".2f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("RSS vs 2 layers", "rss_ratio", ".3f"),
    ("result", "result", "s"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default="2,8,16,24")
    parser.add_argument("--wide-layers", type=int, default=2, help="qwen3-235b-a22b-shaped run (0: none)")
    parser.add_argument("--torch-layers", default="2", help="depths also exported with torch.onnx.export")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--max-disk-gb", type=float, default=50.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))
    torch_layers = {int(n) for n in args.torch_layers.split(",") if n}
    rows = []
    try:
        for n in (int(n) for n in args.layers.split(",")):
            rows += bench_run("qwen3-30b-a3b", n, work, args.dtype, args.max_disk_gb * GB, n in torch_layers)
        if args.wide_layers:
            rows += bench_run(
                "qwen3-235b-a22b", args.wide_layers, work, args.dtype, args.max_disk_gb * GB, False
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next((r for r in rows if r["layers"] == 2 and r["pipeline"].startswith("qwen3-compile")), None)
    for r in rows:
        r["result"] = r.get("error", "ok")
        if "peak_rss_mb" in r and base and r["model"].startswith("qwen3-30b") and r["pipeline"] != TORCH:
            r["rss_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        if "error" not in r:
            r["s_per_gb"] = r["wall_s"] / r["weights_gb"]
    print(markdown_table(rows, COLUMNS))
    ours = [r for r in rows if r["pipeline"].startswith("qwen3-compile") and "error" not in r]
    narrow = [r for r in ours if r["model"].startswith("qwen3-30b")]
    if len(narrow) >= 2:  # least-squares line through peak RSS against layers
        xs, ys = [r["layers"] for r in narrow], [r["peak_rss_mb"] for r in narrow]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        print(f"\npeak RSS ~ {my - slope * mx:.0f} MB + {slope:.2f} MB/layer (30B-A3B shapes)")
        print(f"projected qwen3-30b-a3b, 48 layers: {my + slope * (48 - mx):.0f} MB")
        wide = next((r for r in ours if r["model"].startswith("qwen3-235b")), None)
        if wide:
            # a 235B layer has the same tensors and nodes as a 30B one (only larger): the same slope
            projected = wide["peak_rss_mb"] + max(slope, 0) * (94 - wide["layers"])
            print(
                f"projected qwen3-235b-a22b, 94 layers: {projected:.0f} MB (its measured slice + the slope)"
            )
    for preset, layers in (("qwen3-30b-a3b", 48), ("qwen3-235b-a22b", 94)):
        seconds = graph_only_seconds(preset, layers)
        print(f"graph construction without weights, {preset} x{layers}: {seconds:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
