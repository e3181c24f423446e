"""ExpertDispatch over INT4-dequantized experts -> ONNX Runtime's com.microsoft::QMoE (4-bit weights,
block-wise scales).

The canonical INT4 graph feeds ExpertDispatch from `DequantizeLinear(int4 [E, rows, cols], scale [E, rows,
cols / g], axis=2, block_size=g)`: one scale per expert, output row and group of g input channels
(quantize/int4.py). QMoE represents exactly that only with its `block_size` attribute (fc*_scales
`[E, rows, cols / g]`), which ONNX Runtime added in 1.23. Measured on ORT CPU with fp32 activations (this
rule's one-node test, run under each wheel): 1.22.0's QMoE has per-row scales only (`[E, rows]`), fp16
activations only and no SwiGLU fusion, so a group-g INT4 expert cannot be written for it; 1.23.2 accepts
`block_size` but computes wrong numbers (relative error 1.2-1.5); 1.24.4, 1.26, 1.28, 1.30 and 1.32 match
the canonical graph to 1e-6. The rule therefore declines, saying so, under an ONNX Runtime older than 1.24
(our pin allows 1.22).

Weights: uint8 `[E, rows, cols / 2]`, each row's input channels in order, two a byte, low nibble first,
stored as q + 8 (QMoE's default 4-bit zero point; no zero-point input); fc1 rows interleaved gate/up as
for MoE, with their scales. `accuracy_level` is left at its default 0: fp32 activations for 4-bit experts
(ORT 1.32 documents 4 as the int8-activation level; 1.23 has no such attribute).

Imported asymmetric experts (an AWQ or GPTQ MoE checkpoint: `DequantizeLinear(uint4, scale, uint4 zero
point)`) use QMoE's fc1/fc2 zero-point inputs where the installed ONNX Runtime declares them: the stored
values as they are (no + 8) and zero points `[E, rows, ceil(cols / g / 2)]`, two a byte, low nibble first
(a symmetric partner gets zero point 8). Measured exact against numpy on ORT 1.32 CPU (one-node test).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import onnx

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH
from qwen3_compile.lower.ort_matmul_nbits import (
    INT4_ZERO_POINT,
    int4_source,
    is_int4_dequantized,
    pack_nibbles,
    unsigned_values,
)
from qwen3_compile.lower.ort_moe import ORT_DOMAIN, interleave_gate_up
from qwen3_compile.lower.ort_qmoe import not_a_silu_dispatch, qmoe_node
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

MIN_ORT = (1, 24)  # the first ONNX Runtime whose block-wise 4-bit QMoE was measured exact (see above)


@functools.cache
def ort_qmoe_int4_blocks() -> tuple[bool, str]:
    """(whether the installed ONNX Runtime runs group-wise 4-bit QMoE exactly, its version)."""
    from qwen3_compile.backends.onnxruntime.settings import installed_version

    version = installed_version()
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return release >= MIN_ORT, version


class Int4ExpertDispatchToOrtQMoE(RewriteRule):
    name = "int4_expert_dispatch_to_ort_qmoe"
    target_op = (DOMAIN, EXPERT_DISPATCH)

    def reports(self, view: GraphView, node: onnx.NodeProto) -> bool:
        # float and INT8 experts are other rules' business
        return (node.domain, node.op_type) == self.target_op and any(
            is_int4_dequantized(view, value) for value in node.input[2:4]
        )

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        why = not_a_silu_dispatch(view, node)
        if why:
            return why
        sources = [int4_source(view, value, axis=2) for value in node.input[2:4]]
        for source in sources:
            if isinstance(source, str):
                return source
        if sources[0][2] != sources[1][2]:
            return "gate_up and down have different group sizes (QMoE has one block_size)"
        supported, version = ort_qmoe_int4_blocks()
        if not supported:
            return (
                f"onnxruntime {version}'s QMoE cannot represent group-{sources[0][2]} INT4 experts exactly "
                "(1.22: per-row 4-bit scales only; 1.23: block_size gives wrong numbers on CPU): the "
                "reference body runs; use onnxruntime >= 1.24"
            )
        if any(source[3] is not None for source in sources) and not ort_qmoe_zero_points():
            return f"onnxruntime {version}'s QMoE has no zero points: the reference body runs"
        return None

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        (q1, s1, block, z1), (q2, s2, _, z2) = (int4_source(view, v, axis=2) for v in node.input[2:4])
        arrays = {
            q1 + ".qmoe": pack_nibbles(interleave_gate_up(unsigned_values(view, q1, z1))),
            s1 + ".qmoe": interleave_gate_up(view.array(s1)),
            q2 + ".qmoe": pack_nibbles(unsigned_values(view, q2, z2)),
            s2 + ".qmoe": view.array(s2),
        }
        zero_points = {}
        if z1 is not None or z2 is not None:  # an imported asymmetric checkpoint's experts
            zp1, zp2 = (_zero_points(view, z, s) for z, s in ((z1, s1), (z2, s2)))
            zero_points = {
                q1 + ".qmoe_zero_point": pack_nibbles(interleave_gate_up(zp1)),
                q2 + ".qmoe_zero_point": pack_nibbles(zp2),
            }
        qmoe = qmoe_node(view, node, list(arrays), 4, list(zero_points), block_size=block)
        return Replacement([qmoe], arrays | zero_points, {ORT_DOMAIN: 1})


def _zero_points(view: GraphView, zero: str | None, scale: str) -> np.ndarray:
    """A weight's block zero points (uint8, the scales' shape); 8 for a symmetric partner."""
    if zero is not None:
        return view.array(zero).astype(np.uint8)
    return np.full(tuple(view.initializers[scale].dims), INT4_ZERO_POINT, np.uint8)


@functools.cache
def ort_qmoe_zero_points() -> bool:
    """Whether the installed ONNX Runtime's QMoE declares fc1/fc2 zero-point inputs."""
    from qwen3_compile.backends.onnxruntime.settings import contrib_op_inputs

    return {"fc1_zero_points", "fc2_zero_points"} <= contrib_op_inputs("QMoE")
