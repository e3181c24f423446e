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


@cache
def _function_text(op_type: str) -> str:
    name = {EXPERT_DISPATCH: "expert_dispatch.onnxtxt"}[op_type]
    return resources.files("qwen3_compile").joinpath("graphs", name).read_text()


def function(op_type: str, opset: int) -> onnx.FunctionProto:
    """The op's FunctionProto with its body importing the model's default-domain `opset`.

    The body uses ops whose semantics are unchanged from opset 18 to 24; ONNX wants a function's
    default-domain version to equal the model's, so it is rewritten here.
    """
    fn = onnx.parser.parse_function(_function_text(op_type))
    del fn.opset_import[:]
    fn.opset_import.append(onnx.helper.make_opsetid("", opset))
    return fn
