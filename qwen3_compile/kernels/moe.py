"""ctypes binding of the qmoe CUDA library, and the float64 torch reference of Qwen3's MoE block.

Layouts follow transformers 5: `gate_up [E, 2I, H]` (gate rows first), `down [E, H, I]`.
Nothing here touches CUDA until a kernel function is called.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .build import build_library

QMOE_F32, QMOE_F16, QMOE_BF16, QMOE_I8, QMOE_I4 = 0, 1, 2, 3, 4
# "mma": the tensor cores (wgmma on SM 9.0 for 16-bit weights, else mma.sync);
# "mma_sync" and "wgmma" force one kernel (wgmma: SM 9.0, 16-bit or INT4 weights).
PATHS = {"auto": 0, "gemv": 1, "mma": 2, "mma_sync": 3, "wgmma": 4}
PATH_NAMES = {v: k for k, v in PATHS.items()}
_DTYPE_CODE = {
    torch.float32: QMOE_F32,
    torch.float16: QMOE_F16,
    torch.bfloat16: QMOE_BF16,
    torch.int8: QMOE_I8,
    torch.uint8: QMOE_I4,  # two signed 4-bit weights a byte, low nibble first
}


class QmoeError(RuntimeError):
    """A qmoe entry point returned a non-zero status."""


class _Problem(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "num_tokens",
            "num_experts",
            "top_k",
            "hidden",
            "inter",
            "act_dtype",
            "weight_dtype",
            "scale_dtype",
            "logits_dtype",
            "normalize",
            "path",
            "group_size",
        )
    ]


class _Tensors(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("gate_up", ctypes.c_void_p),
        ("down", ctypes.c_void_p),
        ("gate_up_scale", ctypes.c_void_p),
        ("down_scale", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("topk_ids", ctypes.c_void_p),
        ("topk_weights", ctypes.c_void_p),
        ("expert_offsets", ctypes.c_void_p),
        ("permuted_pairs", ctypes.c_void_p),
    ]


@functools.cache
def load_library(path: str | None = None) -> ctypes.CDLL:
    """Load libqmoe: `path`, `$QWEN3_COMPILE_QMOE_LIB` (e.g. a CMake build), or a build for the current
    GPU's architecture (compiled on first use)."""
    path = path or os.environ.get("QWEN3_COMPILE_QMOE_LIB") or None
    if path is None:
        major, minor = torch.cuda.get_device_capability()
        path = str(build_library(archs=(f"{major}{minor}",)).path)
    lib = ctypes.CDLL(str(Path(path)))
    lib.qmoe_error_string.restype = ctypes.c_char_p
    lib.qmoe_error_string.argtypes = [ctypes.c_int]
    lib.qmoe_workspace_size.argtypes = [ctypes.POINTER(_Problem), ctypes.POINTER(ctypes.c_size_t)]
    lib.qmoe_check_problem.argtypes = [ctypes.POINTER(_Problem)]
    lib.qmoe_route.argtypes = [
        ctypes.POINTER(_Problem),
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.qmoe_forward.argtypes = [ctypes.POINTER(_Problem), ctypes.POINTER(_Tensors), ctypes.c_void_p]
    lib.qmoe_resolve_path.argtypes = [ctypes.POINTER(_Problem)]
    return lib


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        raise QmoeError(f"{what}: {lib.qmoe_error_string(status).decode()} (status {status})")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class Routing:
    """What the kernels decided, for inspection: [T, k] ids/weights, [E+1] offsets, [T*k] permutation."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    expert_offsets: torch.Tensor
    permuted_pairs: torch.Tensor


def _problem(x, logits, gate_up, top_k, normalize, scale, path) -> _Problem:
    T, H = x.shape
    E, two_i, H2 = gate_up.shape
    int4 = gate_up.dtype == torch.uint8
    if int4:  # packed: H/2 bytes a row, scales [E, 2I, H/G]
        H2 *= 2
        if scale is None or scale.dim() != 3 or H % scale.shape[-1]:
            raise ValueError("INT4 weights need per-group scales [E, 2I, H/G]")
    if H2 != H or logits.shape != (T, E):
        shapes = f"x {tuple(x.shape)}, logits {tuple(logits.shape)}, gate_up {tuple(gate_up.shape)}"
        raise ValueError(f"shape mismatch: {shapes}")
    return _Problem(
        num_tokens=T,
        num_experts=E,
        top_k=top_k,
        hidden=H,
        inter=two_i // 2,
        act_dtype=_DTYPE_CODE[x.dtype],
        weight_dtype=_DTYPE_CODE[gate_up.dtype],
        scale_dtype=_DTYPE_CODE[scale.dtype] if scale is not None else QMOE_F32,
        logits_dtype=_DTYPE_CODE[logits.dtype],
        normalize=int(normalize),
        path=PATHS[path],
        group_size=H // scale.shape[-1] if int4 else 0,
    )


def resolve_path(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    top_k: int,
    gate_up_scale: torch.Tensor | None = None,
    path: str = "auto",
    library: str | None = None,
) -> str:
    """The expert kernel `moe_forward` would run on the current GPU: "gemv", "mma_sync" or "wgmma"."""
    lib = load_library(library)
    prob = _problem(x, router_logits, gate_up, top_k, True, gate_up_scale, path)
    got = lib.qmoe_resolve_path(ctypes.byref(prob))
    if got < 0:
        _check(lib, -got, f"qmoe_resolve_path({path})")
    return PATH_NAMES[got]


def workspace_bytes(problem: _Problem, lib: ctypes.CDLL | None = None) -> int:
    lib = lib or load_library()
    n = ctypes.c_size_t()
    _check(lib, lib.qmoe_workspace_size(ctypes.byref(problem), ctypes.byref(n)), "qmoe_workspace_size")
    return n.value


def moe_forward(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalize: bool = True,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    path: str = "auto",
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    return_routing: bool = False,
    library: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Routing]:
    """Qwen3 MoE block on the GPU: x [T, H] (fp16/bf16), router_logits [T, E] -> out [T, H].

    INT8 weight-only: pass int8 `gate_up`/`down` with per-output-channel `gate_up_scale [E, 2I]` and
    `down_scale [E, H]` (fp32 or fp16). INT4 weight-only (`quantize_int4`): uint8 `gate_up [E, 2I, H/2]`,
    `down [E, H, I/2]` (two weights a byte, low nibble first) with per-group `gate_up_scale [E, 2I, H/G]`,
    `down_scale [E, H, I/G]`; G (32, 64 or 128) is read from the scales' shape. Runs on the current torch
    stream; all tensors contiguous, one device.
    """
    lib = load_library(library)
    tensors = [x, router_logits, gate_up, down, gate_up_scale, down_scale]
    for t in tensors:
        if t is not None and (not t.is_cuda or not t.is_contiguous()):
            raise ValueError("moe_forward needs contiguous CUDA tensors")
    prob = _problem(x, router_logits, gate_up, top_k, normalize, gate_up_scale, path)
    _check(lib, lib.qmoe_check_problem(ctypes.byref(prob)), "qmoe_check_problem")
    T, E = router_logits.shape
    if out is None:
        out = torch.empty_like(x)
    need = workspace_bytes(prob, lib)
    if workspace is None or workspace.numel() < need:
        workspace = torch.empty(need, dtype=torch.uint8, device=x.device)
    routing = None
    if return_routing:
        dev = x.device
        routing = Routing(
            topk_ids=torch.empty(T, top_k, dtype=torch.int32, device=dev),
            topk_weights=torch.empty(T, top_k, dtype=torch.float32, device=dev),
            expert_offsets=torch.empty(E + 1, dtype=torch.int32, device=dev),
            permuted_pairs=torch.empty(T * top_k, dtype=torch.int32, device=dev),
        )
    ten = _Tensors(
        x=_ptr(x),
        logits=_ptr(router_logits),
        gate_up=_ptr(gate_up),
        down=_ptr(down),
        gate_up_scale=_ptr(gate_up_scale),
        down_scale=_ptr(down_scale),
        out=_ptr(out),
        workspace=_ptr(workspace),
        workspace_bytes=workspace.numel(),
        topk_ids=_ptr(routing.topk_ids) if routing else None,
        topk_weights=_ptr(routing.topk_weights) if routing else None,
        expert_offsets=_ptr(routing.expert_offsets) if routing else None,
        permuted_pairs=_ptr(routing.permuted_pairs) if routing else None,
    )
    stream = torch.cuda.current_stream(x.device).cuda_stream
    _check(
        lib, lib.qmoe_forward(ctypes.byref(prob), ctypes.byref(ten), ctypes.c_void_p(stream)), "qmoe_forward"
    )
    return (out, routing) if return_routing else out


def moe_route(
    router_logits: torch.Tensor, top_k: int, normalize: bool = True, library: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router kernel alone: logits [T, E] -> (ids int32 [T, k], weights fp32 [T, k])."""
    lib = load_library(library)
    T, E = router_logits.shape
    prob = _Problem(
        num_tokens=T,
        num_experts=E,
        top_k=top_k,
        hidden=128,
        inter=64,
        act_dtype=QMOE_BF16,
        weight_dtype=QMOE_BF16,
        scale_dtype=QMOE_F32,
        logits_dtype=_DTYPE_CODE[router_logits.dtype],
        normalize=int(normalize),
        path=0,
    )
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    w = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    stream = torch.cuda.current_stream(router_logits.device).cuda_stream
    status = lib.qmoe_route(
        ctypes.byref(prob), _ptr(router_logits.contiguous()), _ptr(ids), _ptr(w), ctypes.c_void_p(stream)
    )
    _check(lib, status, "qmoe_route")
    return ids, w


# --------------------------------------------------------------------------------------------------
# Reference and helpers (pure torch, any device).


def route_reference(
    router_logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3MoeTopKRouter: fp32 softmax, torch.topk, optional renormalisation (kept in fp32)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w


def dequantize(
    w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """int8 [..., N, K] * scale [..., N], or packed int4 (uint8 [..., N, K/2]) * per-group scale
    [..., N, K/G] -> dtype; a float weight is just cast."""
    if scale is None:
        return w.to(dtype)
    if w.dtype == torch.uint8:
        q = unpack_int4(w).to(dtype)
        return q * scale.to(dtype).repeat_interleave(q.shape[-1] // scale.shape[-1], dim=-1)
    return w.to(dtype) * scale.to(dtype).unsqueeze(-1)


def moe_reference(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalize: bool = True,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    routing: tuple[torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Qwen3 sparse MoE block in `dtype` (no intermediate rounding): returns [T, H] in `dtype`.

    The routing (fp32 softmax + top-k) is computed as Qwen3 does unless `routing=(ids, weights)` is given.
    """
    ids, w = routing if routing is not None else route_reference(router_logits, top_k, normalize)
    ids = ids.long()
    T, H = x.shape
    inter = gate_up.shape[1] // 2
    xd = x.to(dtype)
    out = torch.zeros(T, H, dtype=dtype, device=x.device)
    for e in torch.unique(ids).tolist():  # only the experts that received a token
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        gu = dequantize(gate_up[e], None if gate_up_scale is None else gate_up_scale[e], dtype)  # [2I, H]
        dn = dequantize(down[e], None if down_scale is None else down_scale[e], dtype)  # [H, I]
        hs = xd[tok] @ gu.T  # [n, 2I]
        h = torch.nn.functional.silu(hs[:, :inter]) * hs[:, inter:]
        out.index_add_(0, tok, (h @ dn.T) * w[tok, slot].to(dtype).unsqueeze(-1))
    return out


def quantize_int8(
    w: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: w [E, N, K] -> (int8 [E, N, K], scale [E, N])."""
    amax = w.float().abs().amax(dim=-1).clamp_min(1e-12)
    scale = (amax / 127.0).to(scale_dtype)
    q = torch.round(w.float() / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-8, 7], [..., K] (K even) -> uint8 [..., K/2]: two a byte, low nibble first (ONNX)."""
    q = q.to(torch.int16)
    return ((q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K] in [-8, 7] (inverse of `pack_int4`)."""
    b = packed.to(torch.int16)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)
    return ((nibbles ^ 8) - 8).to(torch.int8)


def quantize_int4(
    w: torch.Tensor, group: int = 128, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 per group of `group` input channels, the recipe's convention (quantize/int4.py,
    `quantize.weights.quantize_groups`): scale = max|w| / 7 in `scale_dtype` (1 for an all-zero group),
    q = round-half-to-even(w / scale) clipped to [-7, 7]. w [E, N, K] -> (uint8 [E, N, K/2] packed with
    `pack_int4`, scale [E, N, K/group])."""
    *lead, K = w.shape
    wg = w.float().reshape(*lead, K // group, group)
    amax = wg.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round((wg / scale.float().unsqueeze(-1)).clamp(-7.0, 7.0)).reshape(*lead, K)
    return pack_int4(q), scale
