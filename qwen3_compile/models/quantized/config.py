"""`quantization_config` in config.json: which published format a checkpoint is in, read as hostile data.

Recognised (the forms Qwen publishes):
- `fp8`: `{quant_method: "fp8", fmt: "e4m3", weight_block_size: [128, 128], activation_scheme: "dynamic",
  modules_to_not_convert: [...]}`; E4M3 weights with one scale per block, `<weight>_scale_inv`.
- `awq`: `{quant_method: "awq", bits: 4, group_size: 128, zero_point: true, version: "gemm"}`.
- `gptq`: `{quant_method: "gptq", bits: 4 | 8, group_size, desc_act, sym, checkpoint_format: "gptq" |
  "gptq_v2"}`; AutoGPTQ's `gptq` format (the default when the field is absent) stores each zero point
  minus one, `gptq_v2` stores it as is.

Fields that change the meaning of the tensors are checked; unknown methods, versions and values are
refused by name. Fields that only record how the quantizer ran (damp_percent, true_sequential, ...) are
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError

METHODS = ("fp8", "awq", "gptq")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 2}  # zero point stored minus one (v1) or as is (v2)
_MAX_BLOCK = 1 << 16


@dataclass(frozen=True)
class QuantFormat:
    """A recognised checkpoint quantization, typed."""

    method: str  # fp8, awq, gptq
    bits: int  # 8 for fp8
    group_size: int  # input channels per scale (fp8: the block's column count); -1: the whole row
    block_rows: int = 1  # fp8: output rows per block scale
    desc_act: bool = False  # gptq: input channels in activation order (g_idx not contiguous)
    sym: bool = False  # gptq: symmetric (every zero point 2^(bits-1))
    zero_point_offset: int = 0  # gptq v1: stored zero point + 1 is the real one
    checkpoint_format: str = ""
    modules_to_not_convert: tuple[str, ...] = ()

    @property
    def precision(self) -> str:
        """The deployment precision of its weights (a target must have it): fp8, int4 or int8."""
        return deployed_precision(self.method, self.bits)

    @property
    def label(self) -> str:
        if self.method == "fp8":
            return f"fp8 e4m3, {self.block_rows}x{self.group_size} block scales"
        group = "per row" if self.group_size == -1 else f"group {self.group_size}"
        extra = (
            f", {self.checkpoint_format}, desc_act={str(self.desc_act).lower()}"
            if self.method == "gptq"
            else ""
        )
        return f"{self.method} int{self.bits}, {group}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "block_rows": self.block_rows,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "checkpoint_format": self.checkpoint_format,
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }


def deployed_precision(method: str, bits: int) -> str:
    """fp8 for an FP8 checkpoint, else int<bits> (also from an export manifest's `imported` record)."""
    return "fp8" if method == "fp8" else f"int{bits}"


def _refuser(source: str | Path):
    def refuse(key: str, problem: str, fix: str) -> BadInputError:
        return BadInputError(problem, file=source, field=f"quantization_config.{key}", fix=fix)

    return refuse


_UNQUANTIZED_FIX = (
    "use the unquantized (BF16) release of the model and quantize it here (`quantize --recipe fp8`, "
    "`int4-awq`, `int8-wo`, ...)."
)


def _get(cfg: dict, key: str, kind: type | tuple, refuse, default: Any = ..., fix: str = _UNQUANTIZED_FIX):
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise refuse(key, "a required field is missing.", fix)
        return default
    value = cfg[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise refuse(key, f"expected {names}, got {value!r}.", fix)
    return value


def _modules(cfg: dict, refuse) -> tuple[str, ...]:
    mods = _get(cfg, "modules_to_not_convert", list, refuse, default=[])
    if not all(isinstance(m, str) for m in mods):
        raise refuse(
            "modules_to_not_convert", f"expected a list of module names, got {mods!r}.", _UNQUANTIZED_FIX
        )
    return tuple(mods)


def _fp8(cfg: dict, refuse) -> QuantFormat:
    fmt = _get(cfg, "fmt", str, refuse, default="e4m3")
    if fmt != "e4m3":
        raise refuse("fmt", f"FP8 format {fmt!r} is not supported (only e4m3).", _UNQUANTIZED_FIX)
    scheme = _get(cfg, "activation_scheme", str, refuse, default="dynamic")
    if scheme != "dynamic":
        raise refuse(
            "activation_scheme",
            f"activation_scheme {scheme!r}: static FP8 activation scales are not imported (only the "
            "weights of 'dynamic' checkpoints, whose activations carry no stored scale).",
            _UNQUANTIZED_FIX,
        )
    block = _get(
        cfg,
        "weight_block_size",
        list,
        refuse,
        fix="Qwen's FP8 releases use [128, 128]; "
        "per-tensor FP8 checkpoints are not imported. " + _UNQUANTIZED_FIX,
    )
    if len(block) != 2 or not all(type(b) is int and 1 <= b <= _MAX_BLOCK for b in block):
        raise refuse(
            "weight_block_size",
            f"expected two positive block sizes [rows, cols], got {block!r}.",
            "Qwen's FP8 releases use [128, 128].",
        )
    return QuantFormat("fp8", 8, block[1], block_rows=block[0], modules_to_not_convert=_modules(cfg, refuse))


def _group_size(cfg: dict, refuse, allow_row: bool) -> int:
    group = _get(cfg, "group_size", int, refuse)
    if group == -1 and allow_row:
        return group
    if not 1 <= group <= _MAX_BLOCK or group & (group - 1):
        raise refuse(
            "group_size",
            f"group size {group} is not a power of two" + (" or -1" if allow_row else "") + ".",
            "check the checkpoint's config.json.",
        )
    return group


def _awq(cfg: dict, refuse) -> QuantFormat:
    bits = _get(cfg, "bits" if "bits" in cfg else "w_bit", int, refuse)
    if bits != 4:
        raise refuse("bits", f"AWQ with {bits} bits is not supported (only 4).", _UNQUANTIZED_FIX)
    version = _get(cfg, "version", str, refuse, default="gemm")
    if version.lower() != "gemm":
        raise refuse(
            "version",
            f"AWQ packing {version!r} is not supported (only 'gemm').",
            "re-save the model with AutoAWQ's GEMM version, or use the BF16 release.",
        )
    if not _get(cfg, "zero_point", bool, refuse, default=True):
        raise refuse(
            "zero_point", "AWQ without zero points (zero_point: false) is not supported.", _UNQUANTIZED_FIX
        )
    group = _group_size(cfg, refuse, allow_row=False)
    return QuantFormat("awq", 4, group, modules_to_not_convert=_modules(cfg, refuse))


def _gptq(cfg: dict, refuse) -> QuantFormat:
    bits = _get(cfg, "bits", int, refuse)
    if bits not in (4, 8):
        raise refuse("bits", f"GPTQ with {bits} bits is not supported (4 or 8).", _UNQUANTIZED_FIX)
    fmt = _get(cfg, "checkpoint_format", str, refuse, default="gptq")
    if fmt not in GPTQ_FORMATS:
        raise refuse(
            "checkpoint_format",
            f"GPTQ checkpoint format {fmt!r} is not recognised (known: {', '.join(GPTQ_FORMATS)}).",
            "re-save the model with AutoGPTQ/GPTQModel in the 'gptq' or 'gptq_v2' format.",
        )
    if _get(cfg, "lm_head", bool, refuse, default=False):
        raise refuse(
            "lm_head",
            "a quantized lm_head is not imported (qwen3-compile keeps lm_head in float).",
            _UNQUANTIZED_FIX,
        )
    for key in ("modules_in_block_to_quantize", "dynamic"):
        if cfg.get(key):
            raise refuse(key, f"per-module GPTQ settings ({key}) are not supported.", _UNQUANTIZED_FIX)
    return QuantFormat(
        "gptq",
        bits,
        _group_size(cfg, refuse, allow_row=True),
        desc_act=_get(cfg, "desc_act", bool, refuse, default=False),
        sym=_get(cfg, "sym", bool, refuse, default=True),
        zero_point_offset=1 if GPTQ_FORMATS[fmt] == 1 else 0,
        checkpoint_format=fmt,
    )


def parse_quantization_config(cfg: dict[str, Any], source: str | Path) -> QuantFormat | None:
    """The checkpoint's quantization from config.json (None when it has none)."""
    quant = cfg.get("quantization_config")
    if quant is None:
        return None
    refuse = _refuser(source)
    if not isinstance(quant, dict):
        raise BadInputError(
            "quantization_config must be an object.",
            file=source,
            field="quantization_config",
            fix=_UNQUANTIZED_FIX,
        )
    method = quant.get("quant_method")
    if method not in METHODS:
        raise refuse(
            "quant_method",
            f"this checkpoint is quantized with {method!r}, which qwen3-compile does not import (it imports "
            f"{', '.join(METHODS)}: Qwen's -FP8, -AWQ and -GPTQ releases).",
            _UNQUANTIZED_FIX,
        )
    return {"fp8": _fp8, "awq": _awq, "gptq": _gptq}[method](quant, refuse)
