"""The project's ONNX op set (domain `qwen3_compile`): custom ops whose reference semantics are ONNX
functions defined in `graphs/*.onnxtxt`, so any ONNX runtime can execute a canonical graph."""

from __future__ import annotations

from functools import cache
from importlib import resources

import onnx
import onnx.parser

DOMAIN = "qwen3_compile"
DOMAIN_VERSION = 1
EXPERT_DISPATCH = "ExpertDispatch"
# ExpertDispatch whose expert intermediate is quantized (W8A8 recipes); written by `quantize`
QUANTIZED_EXPERT_DISPATCH = "QuantizedExpertDispatch"
# ExpertDispatch taking weight-only quantized experts (INT8 / INT4) and their scales as inputs; written by
# `lower --for ort --moe-lowering custom-op` for the ORT custom-op library (lower/ort_custom_op_moe.py)
WEIGHT_ONLY_EXPERT_DISPATCH = "WeightOnlyExpertDispatch"
_FILES = {
    EXPERT_DISPATCH: "expert_dispatch.onnxtxt",
    QUANTIZED_EXPERT_DISPATCH: "quantized_expert_dispatch.onnxtxt",
    WEIGHT_ONLY_EXPERT_DISPATCH: "weight_only_expert_dispatch.onnxtxt",
}


@cache
def _function_text(op_type: str) -> str:
    return resources.files("qwen3_compile").joinpath("graphs", _FILES[op_type]).read_text()


def function(op_type: str, opset: int) -> onnx.FunctionProto:
    """The op's FunctionProto with its body importing the model's default-domain `opset`.

    The body uses ops whose semantics are unchanged from opset 18 to 24; ONNX wants a function's
    default-domain version to equal the model's, so it is rewritten here.
    """
    fn = onnx.parser.parse_function(_function_text(op_type))
    del fn.opset_import[:]
    fn.opset_import.append(onnx.helper.make_opsetid("", opset))
    return fn
