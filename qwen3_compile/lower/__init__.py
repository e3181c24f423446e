"""Per-backend lowering of the canonical graph: ordered rule sets of small rewrite rules."""

from __future__ import annotations

from pathlib import Path

import onnx

from qwen3_compile.errors import BadInputError
from qwen3_compile.lower.greedy_token import GreedyToken
from qwen3_compile.lower.last_logits import LastPositionLogits
from qwen3_compile.lower.ort_custom_op_moe import QuantizedExpertsToWeightOnlyDispatch
from qwen3_compile.lower.ort_gqa import AttentionToGroupQueryAttention
from qwen3_compile.lower.ort_matmul_nbits import Int4MatMulToMatMulNBits
from qwen3_compile.lower.ort_moe import ExpertDispatchToOrtMoE
from qwen3_compile.lower.ort_qmoe import QuantizedExpertDispatchToOrtQMoE
from qwen3_compile.lower.ort_qmoe_int4 import Int4ExpertDispatchToOrtQMoE
from qwen3_compile.lower.ort_rms_norm import RmsNormToSimplifiedLayerNorm
from qwen3_compile.lower.rules import RewriteReport, RewriteRule, apply_rules
from qwen3_compile.lower.trt_dense_moe import ExpertDispatchToDenseExperts
from qwen3_compile.lower.trt_moe import ExpertDispatchToTrtMoE
from qwen3_compile.lower.trt_plugin_moe import ExpertDispatchToQwen3MoePlugin
from qwen3_compile.lower.trt_zero_points import ZeroPointWeightsToSymmetric
from qwen3_compile.storage.external_data import ExternalDataWriter

# target -> ordered rules. The canonical graph (no target) keeps ExpertDispatch with its function body.
RULE_SETS: dict[str, list[type[RewriteRule]]] = {
    # INT8 and INT4 experts first (QMoE); float experts fall through to MoE; INT4 weight-only
    # DequantizeLinear -> MatMul to MatMulNBits (fp32/fp16 activations); RMSNorm to SimplifiedLayerNorm.
    "ort": [
        QuantizedExpertDispatchToOrtQMoE,
        Int4ExpertDispatchToOrtQMoE,
        ExpertDispatchToOrtMoE,
        Int4MatMulToMatMulNBits,
        RmsNormToSimplifiedLayerNorm,
    ],
    # ORT with the project's custom-op library (--ort-ops): float ExpertDispatch stays for libqmoe_ort to
    # claim; INT8/INT4 weight-only experts become WeightOnlyExpertDispatch over the quantized initializers
    "ort-custom-op": [
        QuantizedExpertsToWeightOnlyDispatch,
        Int4MatMulToMatMulNBits,
        RmsNormToSimplifiedLayerNorm,
    ],
    # TensorRT without a sparse MoE kernel: the reference body inlined with unique names
    "trt-dense": [ExpertDispatchToDenseExperts],
    # TensorRT's native IMoELayer; experts it cannot take (quantized) fall back to the dense body
    "trt-moe": [ExpertDispatchToTrtMoE, ExpertDispatchToDenseExperts],
    # the project's qmoe plugin (fp16/bf16 activations, kernel-supported shapes); the rest dense
    "trt-plugin": [ExpertDispatchToQwen3MoePlugin, ExpertDispatchToDenseExperts],
    # imported asymmetric linears (AWQ, GPTQ with zero points): signed weights plus an exact block-sum term
    "trt-symmetric-weights": [ZeroPointWeightsToSymmetric],
    # deployment graphs: logits of the last position only (`build --logits last`, `lower --logits last`)
    "last-logits": [LastPositionLogits],
    # ONNX Runtime deployment graphs (`lower --for ort --logits last`): also the greedy token on the device
    "ort-last-logits": [LastPositionLogits, GreedyToken],
}


# `lower --for ort --attention gqa`: each ORT set plus each layer's attention to one GroupQueryAttention node
# (after the norms, whose outputs it reads), for a static KV cache and CUDA graph capture (runner.py)
RULE_SETS |= {
    f"{name}-gqa": [*RULE_SETS[name], AttentionToGroupQueryAttention] for name in ("ort", "ort-custom-op")
}


def make_rules(
    target: str, *, max_positions: int | None = None, half_experts: bool = False
) -> list[RewriteRule]:
    """The rules of `target`, each given the lowering options it declares (`RewriteRule.options`)."""
    if target not in RULE_SETS:
        raise BadInputError(
            f"unknown lowering target '{target}'.", field="target", fix=f"use one of: {', '.join(RULE_SETS)}."
        )
    given = {"max_positions": max_positions, "half_experts": half_experts}
    return [rule(**{k: given[k] for k in rule.options}) for rule in RULE_SETS[target]]


def lower(
    model: onnx.ModelProto,
    target: str,
    base_dir: Path | None = None,
    weight_sink: ExternalDataWriter | None = None,
    *,
    max_positions: int | None = None,
    half_experts: bool = False,
) -> RewriteReport:
    """Rewrite `model` in place for `target` (see `apply_rules` for external-data models). `max_positions`:
    the export's context limit, which sizes GroupQueryAttention's cos/sin caches (`ort-gqa`); `half_experts`:
    ORT's MoE also takes fp16 experts (CUDA only; `--moe-lowering ort-moe`)."""
    rules = make_rules(target, max_positions=max_positions, half_experts=half_experts)
    return apply_rules(model, rules, base_dir, weight_sink)
