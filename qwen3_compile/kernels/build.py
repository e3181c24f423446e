"""Compile the MoE CUDA sources in `plugins/moe/` with nvcc into a cached shared library.

The library is keyed by a hash of the sources, the nvcc version, the target architectures and the
flags, so an edit to any `.cu` file or a different GPU yields a new build and a stale one is never
loaded. No torch, no CUDA runtime: this module only runs a compiler.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: Architectures the plugin ships for: Jetson Orin, Ada, Hopper, Blackwell DC, Jetson Thor, Blackwell RTX.
#: (CUDA 13 calls Thor sm_110; CUDA 12.x called it sm_101.)
TARGET_ARCHS: tuple[str, ...] = ("87", "89", "90", "100", "110", "120")

NVCC_FLAGS: tuple[str, ...] = (
    "-std=c++17",
    "-O3",
    "-Xcompiler",
    "-fPIC,-fvisibility=hidden",
    "-shared",
    "-lineinfo",
)

_SOURCES = (
    "api.cu",
    "route.cu",
    "experts_gemv.cu",
    "experts_token1.cu",
    "experts_i4mma.cu",
    "experts_mma.cu",
    "experts_wgmma.cu",
)
_HEADERS = (
    "qmoe.h",
    "qmoe_internal.cuh",
    "route_core.cuh",
    "gemv_core.cuh",
    "token1_tasks.cuh",
    "mma_sync.cuh",
    "wgmma_ops.cuh",
)


class KernelBuildError(RuntimeError):
    """nvcc is missing or failed; the message carries its command line and output."""


@dataclass(frozen=True)
class BuiltLibrary:
    """A compiled `libqmoe` and what it was built from."""

    path: Path
    archs: tuple[str, ...]
    key: str
    cached: bool


def plugin_source_dir() -> Path:
    """`plugins/moe` (shipped in the package through the `qwen3_compile/plugins` link), or
    `$QWEN3_COMPILE_PLUGIN_DIR`."""
    env = os.environ.get("QWEN3_COMPILE_PLUGIN_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "plugins" / "moe"


def find_nvcc() -> str | None:
    """nvcc from `$NVCC`, `$CUDA_HOME/bin`, PATH, or the usual install folders."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def cuda_include_dir(nvcc: str) -> Path:
    """The CUDA toolkit's include folder (cuda_runtime_api.h, which TensorRT's headers need), as nvcc
    itself reports it (nvcc may be a wrapper script outside the toolkit)."""
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            for flag in line.split("INCLUDES=", 1)[1].strip().strip('"').split():
                inc = Path(flag.removeprefix("-I").strip('"'))
                if (inc / "cuda_runtime_api.h").is_file():
                    return inc.resolve()
    return Path(nvcc).resolve().parents[1] / "include"


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


# Architectures built with their arch-specific feature set: SM 9.0's prefill kernel needs wgmma (sm_90a).
ARCH_SPECIFIC = {"90": "90a"}


def gencode_flags(archs: tuple[str, ...], ptx: bool = True) -> list[str]:
    """SASS for every arch (sm_90 as sm_90a), plus PTX of the newest so later GPUs can JIT it."""
    named = [ARCH_SPECIFIC.get(a, a) for a in archs]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in named]
    # Arch-specific code (sm_90a) cannot run on later GPUs: no PTX when it is the newest.
    if ptx and archs and max(archs, key=int) not in ARCH_SPECIFIC:
        newest = max(archs, key=int)
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def default_cache_dir() -> Path:
    env = os.environ.get("QWEN3_COMPILE_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen3_compile" / "kernels"


def build_key(
    src_dir: Path, archs: tuple[str, ...], nvcc: str, extra_sources: tuple[str, ...] = (), salt: bytes = b""
) -> str:
    h = hashlib.sha256(salt)
    for name in _SOURCES + extra_sources + _HEADERS:
        h.update(name.encode())
        h.update((src_dir / name).read_bytes())
    h.update(nvcc_version(nvcc).encode())
    h.update(" ".join(archs).encode())
    h.update(" ".join(NVCC_FLAGS).encode())
    return h.hexdigest()[:16]


def build_library(
    archs: tuple[str, ...] | None = None,
    cache_dir: Path | None = None,
    nvcc: str | None = None,
    threads: int | None = None,
    force: bool = False,
    defines: tuple[str, ...] = (),
) -> BuiltLibrary:
    """Compile `plugins/moe/*.cu` into `<cache>/libqmoe-<key>.so`, or return the cached build.

    All architectures go through one nvcc invocation (`--threads` compiles them in parallel). `defines`
    (macro names, e.g. `QMOE_WGMMA_FENCE_PER_SHAPE`) build a variant for measuring against the default;
    they are part of the cache key.
    """
    flags = tuple(f"-D{d}" for d in defines)
    return compile_library("libqmoe", flags, archs, cache_dir, nvcc, threads, force)


def compile_library(
    stem: str,
    extra_flags: tuple[str, ...],
    archs: tuple[str, ...] | None,
    cache_dir: Path | None,
    nvcc: str | None,
    threads: int | None,
    force: bool,
    extra_sources: tuple[str, ...] = (),
    key_salt: bytes = b"",
) -> BuiltLibrary:
    archs = tuple(archs or TARGET_ARCHS)
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found: set $NVCC or $CUDA_HOME, or put nvcc on PATH")
    src_dir = plugin_source_dir()
    sources = _SOURCES + extra_sources
    missing = [n for n in sources + _HEADERS if not (src_dir / n).is_file()]
    if missing:
        raise KernelBuildError(f"plugin sources missing in {src_dir}: {', '.join(missing)}")
    key = build_key(src_dir, archs, nvcc, extra_sources, key_salt + " ".join(extra_flags).encode())
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / f"{stem}-{key}.so"
    if target.is_file() and not force:
        return BuiltLibrary(target, archs, key, cached=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or min(len(archs), os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tmp_out = Path(tmp) / target.name
        cmd = [
            nvcc,
            *NVCC_FLAGS,
            *extra_flags,
            f"-I{src_dir}",
            f"--threads={threads}",
            *gencode_flags(archs),
            "-o",
            str(tmp_out),
            *[str(src_dir / s) for s in sources],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(
                f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
            )
        os.replace(tmp_out, target)  # atomic: a concurrent loader sees the old file or the whole new one
    return BuiltLibrary(target, archs, key, cached=False)
