"""Importing published quantized Qwen3 checkpoints (FP8 block, AWQ GEMM, GPTQ) without re-quantizing.

`parse_quantization_config` reads config.json's `quantization_config` (config.py); `plan_import` maps
every float weight the architecture expects to the stored tensors of its format (fp8.py, awq.py,
gptq.py), checking names, dtypes and shapes from the safetensors headers before anything is read; the
resulting `ImportedQuantization.read(weight)` reads one linear's tensors (safetensors only), checks their
values (NaN/Inf or non-positive scales, out-of-range g_idx, E4M3 NaN) and returns it unpacked
(weight.py): `.dequantize()` is the exact float weight, `onnx_arrays(...)` its DequantizeLinear form.

Only the decoder's linear projections may be quantized (q/k/v/o, gate/up/down, every expert's);
embeddings, lm_head, the MoE router and the norms stay float, as the graph contract says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.quantized import awq, fp8, gptq
from qwen3_compile.models.quantized.config import QuantFormat, parse_quantization_config
from qwen3_compile.models.quantized.weight import NotRepresentable, QdqArrays, UnpackedWeight, onnx_arrays
from qwen3_compile.models.safetensors_index import TensorEntry

__all__ = [
    "ImportedQuantization",
    "NotRepresentable",
    "QdqArrays",
    "QuantFormat",
    "UnpackedWeight",
    "onnx_arrays",
    "parse_quantization_config",
    "plan_import",
]

FORMATS: dict[str, ModuleType] = {"fp8": fp8, "awq": awq, "gptq": gptq}
QUANTIZABLE = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)"
    r"\.weight$"
)
_FIX = (
    "the checkpoint is damaged or not in the format its config.json names: re-download it, or use the BF16 "
    "release."
)


@dataclass(frozen=True)
class QuantizedLinear:
    weight: str  # the float weight it stands for, e.g. model.layers.0.mlp.down_proj.weight
    shape: tuple[int, int]  # [out, in]
    tensors: dict[str, TensorEntry]  # role (qweight, scales, ...) -> stored tensor


@dataclass(frozen=True)
class ImportedQuantization:
    format: QuantFormat
    linears: dict[str, QuantizedLinear]

    @property
    def consumed(self) -> set[str]:
        """The stored tensor names the quantized linears use."""
        return {e.name for q in self.linears.values() for e in q.tensors.values()}

    @property
    def stored_bytes(self) -> int:
        return sum(e.nbytes for q in self.linears.values() for e in q.tensors.values())

    @property
    def quantized_parameters(self) -> int:
        return sum(q.shape[0] * q.shape[1] for q in self.linears.values())

    def summary(self) -> dict[str, Any]:
        """What `inspect` and the export manifest record."""
        modules = sorted({re.sub(r"\.(\d+)\.", ".N.", w.removesuffix(".weight")) for w in self.linears})
        params = self.quantized_parameters
        return self.format.to_dict() | {
            "label": self.format.label,
            "quantized_linears": len(self.linears),
            "quantized_modules": modules,
            "quantized_parameters": params,
            "stored_bytes": self.stored_bytes,
            "bf16_bytes": 2 * params,
        }

    def scales_exact_in_fp16(self) -> bool:
        """Whether every stored scale is an fp16 number, so an fp16 graph holds the weights exactly: F16
        scales (AWQ, GPTQ) are; others (FP8's weight_scale_inv, a small tensor) are read and checked."""
        for linear in self.linears.values():
            for role in ("scale", "scales"):
                entry = linear.tensors.get(role)
                if entry is None or entry.dtype == "F16":
                    continue
                s = np.asarray(_read(entry), dtype=np.float32)
                if not np.array_equal(s.astype(np.float16).astype(np.float32), s):
                    return False
        return True

    def read(self, weight: str) -> UnpackedWeight:
        """One linear's stored tensors, value-checked and unpacked."""
        linear = self.linears[weight]
        arrays = {role: _read(entry) for role, entry in linear.tensors.items()}

        def refuse(role: str, problem: str) -> BadInputError:
            entry = linear.tensors.get(role) or next(iter(linear.tensors.values()))
            name = entry.name if role in linear.tensors else f"{weight.removesuffix('.weight')}.{role}"
            return BadInputError(f"tensor '{name}' {problem}", file=entry.file, field=name, fix=_FIX)

        for role in ("scale", "scales"):
            if role in arrays:
                s = arrays[role]
                if not np.isfinite(s).all():
                    raise refuse(role, "holds NaN or Inf scales.")
                if (s <= 0).any():
                    raise refuse(role, f"holds a non-positive scale ({float(s.min())}).")
        return FORMATS[self.format.method].unpack(self.format, arrays, refuse)


def _read(entry: TensorEntry) -> np.ndarray:
    """One stored tensor as numpy (safetensors, never pickle): int32, float32, or float8_e4m3fn."""
    import ml_dtypes
    import torch
    from safetensors import SafetensorError, safe_open

    from qwen3_compile.storage.user_files import check_regular

    try:
        check_regular(entry.file)
        with safe_open(str(entry.file), framework="pt") as f:
            t = f.get_tensor(entry.name)
    except (SafetensorError, OSError) as err:
        raise BadInputError(
            f"cannot read the weights ({err}).",
            file=entry.file,
            field=entry.name,
            fix="re-download or re-save the file.",
        ) from None
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.float().numpy()
    return t.numpy()


def plan_import(
    fmt: QuantFormat,
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, TensorEntry],
    fused_experts: bool,
    config_path: Path,
) -> ImportedQuantization:
    """Which expected float weights are stored quantized, with every stored tensor's dtype and shape checked
    against the format (headers only)."""
    module = FORMATS[fmt.method]
    if fused_experts:
        raise BadInputError(
            "quantized checkpoints with fused expert tensors (experts.gate_up_proj) are not imported; "
            "Qwen's releases store one matrix per expert.",
            file=config_path.parent,
            field="mlp.experts.gate_up_proj",
            fix="use the checkpoint as published (per-expert tensors).",
        )
    linears: dict[str, QuantizedLinear] = {}
    for name, shape in expected.items():
        if not name.endswith(".weight"):
            continue
        prefix = name.removesuffix(".weight")
        if module.marker(prefix) not in tensors:
            entry = tensors.get(name)
            if fmt.method == "fp8" and entry is not None and entry.dtype.startswith("F8"):
                raise BadInputError(
                    f"tensor '{name}' is {entry.dtype} but has no block scale '{prefix}.weight_scale_inv'.",
                    file=entry.file,
                    field=f"{prefix}.weight_scale_inv",
                    fix=_FIX,
                )
            continue
        marker = tensors[module.marker(prefix)]
        if not QUANTIZABLE.match(name):
            raise BadInputError(
                f"'{prefix}' is stored quantized; qwen3-compile keeps embeddings, lm_head, the MoE router "
                "and norms in float and does not import this.",
                file=marker.file,
                field=marker.name,
                fix="use a checkpoint that leaves these modules unquantized (as Qwen's releases do).",
            )
        if any(prefix == m or prefix.endswith("." + m) for m in fmt.modules_to_not_convert):
            raise BadInputError(
                f"'{prefix}' is listed in modules_to_not_convert but is stored quantized.",
                file=config_path,
                field="quantization_config.modules_to_not_convert",
                fix=_FIX,
            )
        out, inp = shape
        why = module.check_shape(fmt, out, inp)
        if why:
            raise BadInputError(
                f"'{prefix}' cannot be stored in this format: {why}.",
                file=marker.file,
                field=marker.name,
                fix=_FIX,
            )
        linears[name] = QuantizedLinear(name, (out, inp), _stored(module, fmt, prefix, out, inp, tensors))
        if fmt.method != "fp8" and name in tensors:
            raise BadInputError(
                f"'{prefix}' has both a float weight and quantized tensors.",
                file=tensors[name].file,
                field=name,
                fix=_FIX,
            )
    if not linears:
        raise BadInputError(
            f"config.json says the checkpoint is quantized ({fmt.method}) but no weight is stored quantized.",
            file=config_path,
            field="quantization_config",
            fix="remove quantization_config, or re-download.",
        )
    _check_experts_alike(expected, linears, config_path)
    return ImportedQuantization(fmt, linears)


def _stored(module, fmt, prefix, out, inp, tensors) -> dict[str, TensorEntry]:
    found = {}
    for role, (tname, dtypes, shape) in module.stored(prefix, fmt, out, inp).items():
        entry = tensors.get(tname)
        if entry is None:
            if role in getattr(module, "OPTIONAL", ()):
                continue
            raise BadInputError(
                f"tensor '{tname}' is missing ({fmt.method} stores it for every quantized linear).",
                file=tensors[module.marker(prefix)].file,
                field=tname,
                fix=_FIX,
            )
        if entry.dtype not in dtypes:
            raise BadInputError(
                f"tensor '{tname}' is {entry.dtype}; {fmt.method} stores it as {' or '.join(dtypes)}.",
                file=entry.file,
                field=tname,
                fix=_FIX,
            )
        if entry.shape != tuple(shape):
            raise BadInputError(
                f"tensor '{tname}' has shape {list(entry.shape)}; for a [{out}, {inp}] weight "
                f"with {fmt.label} it must be {list(shape)}.",
                file=entry.file,
                field=tname,
                fix="check bits and group_size in quantization_config against the weights.",
            )
        found[role] = entry
    return found


def _check_experts_alike(expected, linears, config_path) -> None:
    """An MoE layer's experts are stacked into one tensor: all quantized or none."""
    layers: dict[str, set[bool]] = {}
    for name in expected:
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.\d+\.", name)
        if m:
            layers.setdefault(m.group(1), set()).add(name in linears)
    for layer, kinds in layers.items():
        if len(kinds) > 1:
            raise BadInputError(
                f"some experts of {layer} are quantized and some are not.",
                file=config_path,
                field="quantization_config",
                fix="use a checkpoint that quantizes all experts.",
            )
