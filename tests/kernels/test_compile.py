"""CPU checks of the MoE plugin: nvcc compiles it for every target arch, the ctypes structs match the C
header, the package imports without torch, and the float64 reference is the Qwen3 block."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import textwrap

import pytest

from qwen3_compile.kernels import build


def test_import_is_light():
    code = "import sys, qwen3_compile.kernels; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# nvcc for Jetson Orin (SM 8.7) and Hopper (SM 9.0, the wgmma kernels) takes ~35 s on 2 cores and every
# target arch three times that: both run in the slow job (CI runs it after the default suite).
# ptxas notice C7519 ("warpgroup.arrive is injected ... to allow use of registers in GMMA") comes once per
# case of the wgmma shape switch when one wgmma.fence precedes the switch; with each shape's block fencing
# for itself (QMOE_WGMMA_FENCE_PER_SHAPE) only the switch's join keeps one a kernel (plugins/moe/NOTES.md).
@pytest.mark.slow
@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (CUDA toolkit absent)")
def test_wgmma_fence_per_shape_leaves_one_arrive_a_kernel(tmp_path):
    src = build.plugin_source_dir()
    cmd = [build.find_nvcc(), "-std=c++17", "-O3", f"-I{src}", "-gencode=arch=compute_90a,code=sm_90a"]
    cmd += ["-Xptxas", "-v", "-c", str(src / "experts_wgmma.cu"), "-o", str(tmp_path / "w.o")]
    log = subprocess.run([*cmd, "-DQMOE_WGMMA_FENCE_PER_SHAPE"], capture_output=True, text=True, check=True)
    text = log.stdout + log.stderr
    kernels = text.count("Compiling entry function '_ZN4qmoe")
    assert kernels >= 28, text[-2000:]  # 16-bit and INT4, every tile configuration
    assert text.count("(C7519)") == kernels, text[-2000:]
    assert text.count(" 0 bytes spill stores, 0 bytes spill loads") == kernels, text[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (CUDA toolkit absent)")
@pytest.mark.parametrize("archs", [("87", "90"), tuple(build.TARGET_ARCHS)], ids=["orin-hopper", "all"])
def test_nvcc_compiles_target_archs(tmp_path, archs):
    lib = build.build_library(archs=archs, cache_dir=tmp_path, threads=2)
    assert lib.path.is_file() and not lib.cached
    assert lib.path.stat().st_size > 100_000
    again = build.build_library(archs=archs, cache_dir=tmp_path)
    assert again.cached and again.path == lib.path
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib.path)], capture_output=True, text=True)
    if exported.returncode == 0:
        for sym in ("qmoe_forward", "qmoe_route", "qmoe_workspace_size", "qmoe_error_string"):
            assert sym in exported.stdout
    check_abi_without_gpu(lib.path)
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(lib.path)], capture_output=True, text=True)
        for arch in archs:
            assert f"sm_{arch}" in listing.stdout, f"no SASS for sm_{arch}"


def check_abi_without_gpu(path):
    """The host-only entry points (argument checks, workspace size) work without a GPU or driver."""
    from qwen3_compile.kernels import moe

    lib = moe.load_library(str(path))
    assert lib.qmoe_abi_version() == 2
    good = dict(num_tokens=2048, num_experts=128, top_k=8, hidden=2048, inter=768, act_dtype=moe.QMOE_BF16)
    good.update(weight_dtype=moe.QMOE_BF16, scale_dtype=moe.QMOE_F32, logits_dtype=moe.QMOE_BF16)
    good.update(normalize=1, path=0)
    assert lib.qmoe_check_problem(ctypes.byref(moe._Problem(**good))) == 0
    n = ctypes.c_size_t()
    assert lib.qmoe_workspace_size(ctypes.byref(moe._Problem(**good)), ctypes.byref(n)) == 0
    P = 2048 * 8
    assert n.value >= P * 4 * 4 + P * (768 + 2048) * 2  # ids, weights, 2 permutations, h, y
    for change, status in [
        ({"hidden": 2000}, 2),
        ({"inter": 700}, 2),
        ({"num_experts": 512}, 2),
        ({"top_k": 129}, 2),
        ({"num_tokens": 0}, 1),
        ({"act_dtype": moe.QMOE_F32}, 1),
        ({"weight_dtype": moe.QMOE_F16}, 1),
        ({"path": 7}, 1),
        # INT4 weights: groups of 32, 64 or 128 dividing H and I; per-group scales are INT4's only
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128}, 0),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 32, "scale_dtype": moe.QMOE_F16}, 0),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 0}, 2),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 16}, 2),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 256}, 2),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128, "inter": 704}, 2),  # I % 128 != 0
        ({"weight_dtype": moe.QMOE_I4, "group_size": 64, "inter": 704}, 0),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128, "scale_dtype": moe.QMOE_BF16}, 1),
        ({"weight_dtype": moe.QMOE_I8, "group_size": 128}, 2),
        ({"group_size": 128}, 2),
        ({"group_size": -1}, 1),
    ]:
        assert lib.qmoe_check_problem(ctypes.byref(moe._Problem(**{**good, **change}))) == status, change
    assert b"unsupported shape" in lib.qmoe_error_string(2)
    # Path resolution without a GPU: GEMV at <= 4 pairs an expert, else mma.sync (wgmma needs SM 9.0);
    # forcing wgmma is refused with QMOE_ERR_UNSUPPORTED (as -2), a bad problem with its status negated.
    lib.qmoe_resolve_path.argtypes = [ctypes.POINTER(moe._Problem)]
    paths = moe.PATHS
    for change, want in [
        ({}, paths["mma_sync"]),
        ({"num_tokens": 64}, paths["gemv"]),
        ({"num_tokens": 64, "path": paths["mma"]}, paths["mma_sync"]),
        ({"path": paths["gemv"]}, paths["gemv"]),
        ({"path": paths["wgmma"]}, -2),
        ({"hidden": 2000}, -2),
        ({"path": 7}, -1),
        # INT4: the same rule as 16-bit weights (no SM 9.0 here: no wgmma)
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128}, paths["mma_sync"]),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128, "num_tokens": 64}, paths["gemv"]),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128, "path": paths["gemv"]}, paths["gemv"]),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128, "path": paths["mma"]}, paths["mma_sync"]),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128, "path": paths["mma_sync"]}, paths["mma_sync"]),
        ({"weight_dtype": moe.QMOE_I4, "group_size": 128, "path": paths["wgmma"]}, -2),
    ]:
        assert lib.qmoe_resolve_path(ctypes.byref(moe._Problem(**{**good, **change}))) == want, change
    # The TensorRT plugins' workspace formula (trt_contract) mirrors the library's, plus 256 for alignment.
    from qwen3_compile.kernels import trt_contract

    for T, E, k, H, inter in [(2048, 128, 8, 2048, 768), (1, 16, 2, 128, 64), (333, 256, 32, 384, 320)]:
        prob = moe._Problem(
            **{**good, "num_tokens": T, "num_experts": E, "top_k": k, "hidden": H, "inter": inter}
        )
        assert lib.qmoe_workspace_size(ctypes.byref(prob), ctypes.byref(n)) == 0
        assert trt_contract.workspace_bytes(T, E, k, H, inter) == n.value + 256, (T, E, k, H, inter)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler")
def test_ctypes_structs_match_header(tmp_path):
    from qwen3_compile.kernels import moe  # torch on CPU is fine here

    src = tmp_path / "layout.c"
    src.write_text(
        textwrap.dedent(
            f"""
            #include <stdio.h>
            #include <stddef.h>
            #include "{build.plugin_source_dir() / "qmoe.h"}"
            int main(void) {{
              printf("%zu %zu %zu %zu %zu %zu\\n", sizeof(qmoe_problem), sizeof(qmoe_tensors),
                     offsetof(qmoe_problem, path), offsetof(qmoe_problem, group_size),
                     offsetof(qmoe_tensors, workspace_bytes), offsetof(qmoe_tensors, permuted_pairs));
              return 0;
            }}
            """
        )
    )
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    got = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    want = [
        ctypes.sizeof(moe._Problem),
        ctypes.sizeof(moe._Tensors),
        moe._Problem.path.offset,
        moe._Problem.group_size.offset,
        moe._Tensors.workspace_bytes.offset,
        moe._Tensors.permuted_pairs.offset,
    ]
    assert [int(v) for v in got] == want


def test_reference_matches_transformers_style_block():
    torch = pytest.importorskip("torch")
    from qwen3_compile.kernels.moe import dequantize, moe_reference, quantize_int8

    g = torch.Generator().manual_seed(0)
    T, E, k, H, inter = 5, 8, 2, 32, 16
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    logits = torch.randn(T, E, generator=g)
    gate_up = torch.randn(E, 2 * inter, H, generator=g, dtype=torch.float64) / H**0.5
    down = torch.randn(E, H, inter, generator=g, dtype=torch.float64) / inter**0.5
    got = moe_reference(x, logits, gate_up, down, k, normalize=True)

    # Dense formulation: every token through every expert, masked by its renormalised top-k weights.
    p = torch.softmax(logits.float(), -1)
    w, ids = torch.topk(p, k, -1)
    w = (w / w.sum(-1, keepdim=True)).double()
    dense = torch.zeros(T, E, dtype=torch.float64)
    dense.scatter_(1, ids, w)
    hs = torch.einsum("th,enh->ten", x, gate_up)
    h = torch.nn.functional.silu(hs[..., :inter]) * hs[..., inter:]
    y = torch.einsum("tei,ehi->teh", h, down)
    want = (y * dense.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    q, s = quantize_int8(gate_up)
    assert q.dtype == torch.int8 and s.shape == (E, 2 * inter)
    err = (dequantize(q, s) - gate_up).abs() / s.double().unsqueeze(-1)
    assert err.max() <= 0.5 + 1e-6  # round to nearest: at most half a step
