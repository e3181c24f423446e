"""Build and load `stream_probe.cu`: single-pass read and copy kernels that measure what one pass over a
buffer costs on this GPU. bench_stream_floor.py times them over a range of sizes and shapes;
bench_moe_kernels.py uses one as its read floor at each decode size."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # run as a script from anywhere: the package beside benchmarks/
    sys.path.insert(0, ROOT)
from qwen3_compile.kernels.build import find_nvcc, gencode_flags  # noqa: E402

SOURCE = Path(__file__).with_name("stream_probe.cu")
THREADS = 256  # the probes' fixed block size
LAYOUTS = {"grid": 0, "warp": 1}
# The read floor's shape: warp-contiguous chunks, 8 loads in flight a thread, 4 blocks an SM. On an H100 it
# came within 1 % of the best of bench_stream_floor.py's 32 shapes at every size from 25 MB to 1 GiB.
FLOOR_READ = {"layout": "warp", "in_flight": 8, "blocks_per_sm": 4}


def build_probe(arch: str, out_dir: Path) -> Path:
    """nvcc the probes into a shared library for `arch` (e.g. "90", built as libqmoe's gencode_flags build
    it); -Xptxas -v output kept beside it as ptxas.txt."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set $NVCC or $CUDA_HOME)")
    lib = out_dir / f"libstream_probe_sm{arch}.so"
    cmd = [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-shared", "-Xptxas", "-v"]
    cmd += [*gencode_flags((arch,), ptx=False), "-o", str(lib), str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    (out_dir / "ptxas.txt").write_text(done.stderr)
    return lib


def load_probe(lib: Path) -> ctypes.CDLL:
    """The built library with its two entry points typed (each returns a cudaError_t)."""
    probe = ctypes.CDLL(str(lib))
    vp, sz, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    probe.probe_read.argtypes = [vp, sz, vp, i32, i32, i32, i32, vp]
    probe.probe_copy.argtypes = [vp, vp, sz, i32, i32, i32, vp]
    return probe


def checked(err: int) -> None:
    if err:
        raise RuntimeError(f"probe launch failed: cudaError {err}")
