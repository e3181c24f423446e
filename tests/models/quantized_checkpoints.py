"""Tiny checkpoints in the published quantized formats, written by the tests from float weights with
packers of their own (from the formats' documentation, independent of qwen3_compile.models.quantized),
plus each weight's expected dequantization in numpy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.tensors import ExpertLayout, expected_shapes

_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rope_theta=1e6,
    bos_token_id=1,
    eos_token_id=2,
)
ARCHS = {
    "dense": Qwen3Arch(**_COMMON, tie_word_embeddings=True, intermediate_size=128),
    "moe": Qwen3Arch(**_COMMON, tie_word_embeddings=False, num_experts=4, top_k=2, moe_intermediate_size=32),
}
LINEAR = re.compile(r"(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's GEMM packer: nibble k of a word holds column AWQ_ORDER[k]


def _fp8(w: np.ndarray, block: tuple[int, int]):
    out, inp = w.shape
    br, bc = block
    rows, cols = -(-out // br), -(-inp // bc)
    scale = np.zeros((rows, cols), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            s = np.float32(max(np.abs(tile).max(), 1e-4) / 448.0)
            scale[i, j] = s
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = (tile / s).astype(ml_dtypes.float8_e4m3fn)
    expected = np.zeros(w.shape, np.float32)
    for r in range(out):
        for c in range(inp):
            expected[r, c] = np.float32(q[r, c]) * scale[r // br, c // bc]
    return {"weight": q, "weight_scale_inv": scale}, expected


def _asym(w_group: np.ndarray, bits: int):
    """Per output row of a group [G, out]: min/max grid -> (q, zero, scale)."""
    top = (1 << bits) - 1
    lo, hi = np.minimum(w_group.min(0), 0), np.maximum(w_group.max(0), 0)
    scale = ((hi - lo) / top).astype(np.float16).astype(np.float32)
    scale = np.maximum(scale, np.float32(1e-4))
    zero = np.clip(np.round(-lo / scale), 0, top)
    q = np.clip(np.round(w_group / scale) + zero, 0, top)
    return q.astype(np.int64), zero.astype(np.int64), scale


def _awq(w: np.ndarray, group: int):
    wt = w.T  # [in, out]
    inp, out = wt.shape
    q = np.zeros((inp, out), np.int64)
    zeros = np.zeros((inp // group, out), np.int64)
    scales = np.zeros((inp // group, out), np.float16)
    for g in range(inp // group):
        qg, zg, sg = _asym(wt[g * group : (g + 1) * group], 4)
        q[g * group : (g + 1) * group], zeros[g], scales[g] = qg, zg, sg
    expected = np.zeros((inp, out), np.float32)
    for i in range(inp):
        expected[i] = (q[i] - zeros[i // group]).astype(np.float32) * scales[i // group].astype(np.float32)

    def pack(m):  # [rows, out] -> int32 [rows, out / 8], interleaved
        words = np.zeros((m.shape[0], m.shape[1] // 8), np.uint64)
        for col in range(m.shape[1]):
            nibble = AWQ_ORDER.index(col % 8)
            words[:, col // 8] |= m[:, col].astype(np.uint64) << np.uint64(4 * nibble)
        return words.astype(np.uint32).view(np.int32)

    return {"qweight": pack(q), "qzeros": pack(zeros), "scales": scales}, expected.T


def _gptq(w: np.ndarray, group: int, bits: int, sym: bool, desc_act: bool, v2: bool, rng):
    wt = w.T  # [in, out]
    inp, out = wt.shape
    per = 32 // bits
    mid, top = 1 << (bits - 1), (1 << bits) - 1
    perm = rng.permutation(inp) if desc_act else np.arange(inp)
    g_idx = np.zeros(inp, np.int32)
    g_idx[perm] = np.arange(inp) // group  # the i-th channel in act order belongs to group i // G
    groups = inp // group
    q = np.zeros((inp, out), np.int64)
    zeros = np.zeros((groups, out), np.int64)
    scales = np.zeros((groups, out), np.float16)
    for g in range(groups):
        rows = np.nonzero(g_idx == g)[0]
        if sym:
            s = (np.abs(wt[rows]).max(0) / (mid - 1)).astype(np.float16).astype(np.float32)
            s = np.maximum(s, np.float32(1e-4))
            z = np.full(out, mid)
            q[rows] = np.clip(np.round(wt[rows] / s) + mid, 0, top)
        else:
            q[rows], z, s = _asym(wt[rows], bits)
        zeros[g], scales[g] = z, s
    expected = (q - zeros[g_idx]).astype(np.float32) * scales[g_idx].astype(np.float32)
    stored_zeros = zeros if v2 else zeros - 1  # AutoGPTQ's v1 format stores zero - 1
    qweight = np.zeros((inp // per, out), np.uint64)
    for i in range(inp):
        qweight[i // per] |= q[i].astype(np.uint64) << np.uint64(bits * (i % per))
    qzeros = np.zeros((groups, out // per), np.uint64)
    for c in range(out):
        qzeros[:, c // per] |= (stored_zeros[:, c].astype(np.uint64) & np.uint64(top)) << np.uint64(
            bits * (c % per)
        )
    tensors = {
        "qweight": qweight.astype(np.uint32).view(np.int32),
        "qzeros": qzeros.astype(np.uint32).view(np.int32),
        "scales": scales,
        "g_idx": g_idx,
    }
    return tensors, expected.T


def quantization_config(kind: str, **opts) -> dict:
    if kind == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(opts.get("block", (128, 128))),
            "modules_to_not_convert": ["lm_head"],
        }
    if kind == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": opts.get("group", 32),
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    return {
        "quant_method": "gptq",
        "bits": opts.get("bits", 4),
        "group_size": opts.get("group", 32),
        "desc_act": opts.get("desc_act", False),
        "sym": opts.get("sym", True),
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq_v2" if opts.get("v2") else "gptq",
    }


def save_quantized_checkpoint(directory: Path, arch_kind: str, kind: str, seed: int = 0, **opts):
    """A checkpoint in format `kind` (fp8, awq, gptq); returns {float weight: expected float32 [out, in]}."""
    import torch
    from safetensors.torch import save_file

    if arch_kind in ARCHS:
        arch = ARCHS[arch_kind]
    else:  # a preset's architecture (the real vocabulary, for validate's prompt suite)
        from qwen3_compile.models.presets import get_preset

        arch = get_preset(arch_kind).arch
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    tensors, expected = {}, {}
    for name, shape in expected_shapes(arch, ExpertLayout.PER_EXPERT).items():
        if name.endswith("norm.weight"):
            w = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w = (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)
        if not LINEAR.search(name):
            tensors[name] = torch.from_numpy(w).to(torch.bfloat16)
            continue
        prefix = name.removesuffix(".weight")
        if kind == "fp8":
            stored, expected[name] = _fp8(w, opts.get("block", (128, 128)))
            stored = {"weight": stored["weight"], "weight_scale_inv": stored["weight_scale_inv"]}
        elif kind == "awq":
            stored, expected[name] = _awq(w, opts.get("group", 32))
        else:
            stored, expected[name] = _gptq(
                w,
                opts.get("group", 32),
                opts.get("bits", 4),
                opts.get("sym", True),
                opts.get("desc_act", False),
                opts.get("v2", False),
                rng,
            )
        for role, value in stored.items():
            if value.dtype == ml_dtypes.float8_e4m3fn:
                t = torch.from_numpy(value.view(np.uint8)).view(torch.float8_e4m3fn)
            else:
                t = torch.from_numpy(np.ascontiguousarray(value))
            tensors[f"{prefix}.{role}" if role != "weight" else name] = t
    config = arch.to_hf_dict() | {"quantization_config": quantization_config(kind, **opts)}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return expected
