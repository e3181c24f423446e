"""INT4 weight-only (W4A16): symmetric INT4 per group of input channels.

Convention (the INT8 one, at 4 bits): per group, scale = max|w| / 7 and q = round-half-to-even(w / scale)
saturated to [-8, 7]; the largest |w| lands on +-7, so -8 never occurs and the grid is symmetric. Zero
point 0. Values are stored as ONNX INT4 (two a byte, low nibble first: `ml_dtypes.int4` arrays, which
onnx packs) behind a blocked `DequantizeLinear` (opset 21) along the input axis:

- linear weights `[in, out]`: axis 0, block_size = group, scales `[in / group, out]`;
- stacked experts `[E, rows, in]`: axis 2, block_size = group, scales `[E, rows, in / group]`.
"""

from __future__ import annotations

import numpy as np
import onnx

from qwen3_compile.errors import BadInputError
from qwen3_compile.quantize.recipe import QuantRecipe

INT4_MIN_OPSET = 21  # INT4 and block_size in DequantizeLinear


def input_axis(ndim: int) -> int:
    """Where a stored weight's input channels are: axis 0 of `[in, out]`, the last of `[E, rows, in]`."""
    return 0 if ndim == 2 else ndim - 1


def dequantize_int4_groups(q: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """The float weights a blocked DequantizeLinear gives for `weights.quantize_groups`' output."""
    axis = input_axis(q.ndim)
    return q.astype(np.float32) * np.repeat(scale.astype(np.float32), group, axis=axis)


def check_int4_model(model: onnx.ModelProto, recipe: QuantRecipe, selected) -> None:
    """Before any work: the graph's opset has blocked INT4 DequantizeLinear, and the group size divides
    the input dimension of every weight the recipe selects (`selected(proto)`)."""
    if recipe.weights.granularity != "per_group":
        return
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if recipe.weights.dtype == "int4" and opset < INT4_MIN_OPSET:
        raise BadInputError(
            f"INT4 weights need DequantizeLinear with block_size (opset {INT4_MIN_OPSET}); this export is "
            f"opset {opset}.",
            field="--opset",
            fix=f"export again with --opset {INT4_MIN_OPSET} or higher (the default is 21).",
        )
    group = recipe.weights.group_size
    for proto in model.graph.initializer:
        if not selected(proto):
            continue
        width = proto.dims[input_axis(len(proto.dims))]
        if width % group:
            divisors = [g for g in (128, 64, 32, 16) if width % g == 0]
            raise BadInputError(
                f"group size {group} does not divide the input dimension {width} of "
                f"{proto.name.removesuffix('.T')} (recipe '{recipe.name}').",
                file=recipe.source or None,
                field="weights.group_size",
                fix=f"use a group size that divides {width} ("
                + (", ".join(map(str, divisors)) if divisors else "none of 16..128 does")
                + "): --group-size N, or a copy of the recipe file with weights.group_size changed.",
            )
