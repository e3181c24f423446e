"""AutoAWQ's GEMM checkpoints (`quant_method: awq, version: gemm`): 4-bit, asymmetric, per group.

Per quantized linear, with G = group_size:
- `qweight` int32 [in, out / 8]: eight 4-bit values of one input row, packed along the output axis;
- `qzeros` int32 [in / G, out / 8]: the zero points, packed the same way;
- `scales` fp16 [in / G, out].
Within an int32 the nibbles are NOT in column order: nibble k (bits 4k..4k+3) holds column
`8 * word + AWQ_ORDER[k]`, AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7) (AutoAWQ's GEMM packer; its unpackers
undo it with the inverse permutation (0, 4, 1, 5, 2, 6, 3, 7)). Zero points are stored as they are. The
float weight is `(q - z) * s`: a uint4 blocked DequantizeLinear with a zero point, exactly.
"""

from __future__ import annotations

import numpy as np

from qwen3_compile.models.quantized.config import QuantFormat
from qwen3_compile.models.quantized.weight import UnpackedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SCALE_DTYPES = ("F16", "BF16", "F32")


def stored(
    prefix: str, fmt: QuantFormat, out: int, inp: int
) -> dict[str, tuple[str, tuple[str, ...], tuple]]:
    g = fmt.group_size
    return {
        "qweight": (f"{prefix}.qweight", ("I32",), (inp, out // 8)),
        "qzeros": (f"{prefix}.qzeros", ("I32",), (inp // g, out // 8)),
        "scales": (f"{prefix}.scales", SCALE_DTYPES, (inp // g, out)),
    }


def marker(prefix: str) -> str:
    return f"{prefix}.qweight"


def check_shape(fmt: QuantFormat, out: int, inp: int) -> str | None:
    if out % 8:
        return f"its {out} output channels are not a multiple of 8 (eight 4-bit values an int32)"
    if inp % fmt.group_size:
        return f"group size {fmt.group_size} does not divide its {inp} input channels"
    return None


def unpack_columns(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, cols / 8] -> int16 [rows, cols] in column order."""
    words = packed.astype(np.int32).view(np.uint32)
    nibbles = np.stack([(words >> (4 * k)) & 0xF for k in range(8)], axis=-1)  # [rows, words, nibble]
    columns = np.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles  # nibble k holds column AWQ_ORDER[k]
    return columns.reshape(packed.shape[0], -1).astype(np.int16)


def unpack(fmt: QuantFormat, arrays: dict[str, np.ndarray], refuse) -> UnpackedWeight:
    q = unpack_columns(arrays["qweight"]).T  # [out, in]
    z = unpack_columns(arrays["qzeros"]).T  # [out, in / G]
    s = arrays["scales"].astype(np.float32).T
    return UnpackedWeight(
        np.ascontiguousarray(q), np.ascontiguousarray(s), np.ascontiguousarray(z), fmt.group_size, 4
    )
