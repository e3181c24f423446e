"""GPTQ checkpoints (AutoGPTQ / GPTQModel, `quant_method: gptq`), 4 or 8 bits.

Per quantized linear, with p = 32 / bits values an int32 and `groups` scales per output channel:
- `qweight` int32 [in / p, out]: packed along the INPUT axis, in order (value k of a word, bits
  k*bits.., is input row p * word + k);
- `qzeros` int32 [groups, out / p]: packed along the output axis, in order;
- `scales` fp16 [groups, out];
- `g_idx` int32 [in]: the group of each input channel; `i // group_size` unless desc_act reordered the
  channels (then each group still has group_size channels, scattered).
Zero points: AutoGPTQ's `gptq` format stores z - 1 (the real zero point is stored + 1), `gptq_v2` stores
z. The float weight is `(q - z[g_idx]) * s[g_idx]`. Symmetric checkpoints (every z = 2^(bits-1)) become
signed values without a zero point.
"""

from __future__ import annotations

import numpy as np

from qwen3_compile.models.quantized.config import QuantFormat
from qwen3_compile.models.quantized.weight import UnpackedWeight

SCALE_DTYPES = ("F16", "BF16", "F32")


def _group(fmt: QuantFormat, inp: int) -> int:
    return inp if fmt.group_size == -1 else fmt.group_size


def stored(
    prefix: str, fmt: QuantFormat, out: int, inp: int
) -> dict[str, tuple[str, tuple[str, ...], tuple]]:
    per = 32 // fmt.bits
    groups = inp // _group(fmt, inp)
    return {
        "qweight": (f"{prefix}.qweight", ("I32",), (inp // per, out)),
        "qzeros": (f"{prefix}.qzeros", ("I32",), (groups, out // per)),
        "scales": (f"{prefix}.scales", SCALE_DTYPES, (groups, out)),
        "g_idx": (f"{prefix}.g_idx", ("I32",), (inp,)),
    }


OPTIONAL = ("g_idx",)  # some writers leave it out when desc_act is false


def marker(prefix: str) -> str:
    return f"{prefix}.qweight"


def check_shape(fmt: QuantFormat, out: int, inp: int) -> str | None:
    per = 32 // fmt.bits
    if inp % per or out % per:
        return f"its shape [{out}, {inp}] does not pack {per} values an int32 on both axes"
    if inp % _group(fmt, inp):
        return f"group size {fmt.group_size} does not divide its {inp} input channels"
    return None


def unpack_values(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> int16 values, `32 / bits` per word, in order along `axis` (0: rows, 1: columns)."""
    words = packed.astype(np.int32).view(np.uint32)
    per, mask = 32 // bits, (1 << bits) - 1
    parts = np.stack([(words >> (bits * k)) & mask for k in range(per)], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= per
    return parts.reshape(shape).astype(np.int16)


def unpack(fmt: QuantFormat, arrays: dict[str, np.ndarray], refuse) -> UnpackedWeight:
    q = unpack_values(arrays["qweight"], fmt.bits, 0).T  # [out, in]
    out, inp = q.shape
    z = unpack_values(arrays["qzeros"], fmt.bits, 1).T + fmt.zero_point_offset  # [out, groups]
    s = arrays["scales"].astype(np.float32).T
    group = _group(fmt, inp)
    g_idx = arrays.get("g_idx")
    if g_idx is None:
        if fmt.desc_act:
            raise refuse("g_idx", "is missing; desc_act checkpoints need it to place their groups.")
    else:
        g_idx = g_idx.astype(np.int64)
        if g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= s.shape[1]:
            bad = int(g_idx[(g_idx < 0) | (g_idx >= s.shape[1])][0])
            raise refuse("g_idx", f"names group {bad}, outside the {s.shape[1]} groups of its scales.")
        if np.array_equal(g_idx, np.arange(inp) // group):
            g_idx = None
        elif not fmt.desc_act:
            raise refuse(
                "g_idx", "is not in channel order (i // group_size), but the config says desc_act is false."
            )
    return UnpackedWeight(
        np.ascontiguousarray(q), np.ascontiguousarray(s), np.ascontiguousarray(z), group, fmt.bits, g_idx
    )
