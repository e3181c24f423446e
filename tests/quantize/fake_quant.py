"""An independent reference for W8A8 artifacts: transformers' model with its weights and activations
fake-quantized in torch (the artifact contributes only its activation scales and norm weights; the
quantization math, the expert loop and the routing are torch's)."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from safetensors.numpy import load_file

QMAX = {"int8": 127.0, "fp8": 448.0}


def fake_quant(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """QuantizeLinear + DequantizeLinear: round half to even, saturate to the type's range (INT8
    [-128, 127]: symmetric scales, asymmetric integers; E4M3 +-448)."""
    if dtype == "int8":
        return torch.round(x / scale).clamp(-128, 127) * scale
    return (x / scale).clamp(-QMAX[dtype], QMAX[dtype]).to(torch.float8_e4m3fn).float() * scale


def per_row(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """Weights [..., rows, in]: one scale per row (per expert and row for stacked experts)."""
    amax = w.abs().amax(dim=-1, keepdim=True)
    return fake_quant(w, torch.where(amax > 0, amax / QMAX[dtype], 1.0), dtype)


def artifact_activation_scales(model_path) -> dict[str, float]:
    """checkpoint weight name -> the per-tensor scale of its input, read from the QDQ graph."""
    model = onnx.load(str(model_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    scales = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "QuantizedExpertDispatch") and node.input[0].endswith(".qdq"):
            dq = producer[node.input[0]]
            weight = node.input[1 if node.op_type == "MatMul" else 2].removesuffix(".dequantized")
            scales[weight.removesuffix(".T")] = float(inits[dq.input[1]])
        if node.op_type == "QuantizedExpertDispatch":
            scales[node.input[3].removesuffix(".dequantized")] = float(inits[node.input[4]])
    return scales


@torch.no_grad()
def fake_quantized_reference(model: torch.nn.Module, artifact_dir: Path, dtype: str) -> torch.nn.Module:
    """Quantize `model` (transformers, fp32) in place the way the artifact says it is quantized: its
    activation scales from the graph, its SmoothQuant scales from calibration.safetensors."""
    scales = artifact_activation_scales(artifact_dir / "model.onnx")
    smoothing = {}
    if (artifact_dir / "calibration.safetensors").exists():
        stored = load_file(str(artifact_dir / "calibration.safetensors"))
        smoothing = {
            k.removeprefix("smoothquant/"): torch.from_numpy(v)
            for k, v in stored.items()
            if k.startswith("smoothquant/")
        }
    params = dict(model.named_parameters())
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, torch.nn.Linear) and key in scales:
            norm = _smoothing_norm(name, smoothing)
            if norm is not None:  # SmoothQuant: X / s from the norm, W * s
                module.weight.copy_(module.weight.double() * smoothing[norm])
            module.weight.copy_(per_row(module.weight, dtype))
            scale = torch.tensor(scales[key])
            module.register_forward_pre_hook(lambda m, a, s=scale: (fake_quant(a[0], s, dtype),))
        if name.endswith("mlp.experts"):
            _quantize_experts(module, name, scales, dtype, model, smoothing)
    for norm, s in smoothing.items():
        params[norm].copy_(params[norm].double() / s)
    return model


def _smoothing_norm(linear: str, norms: dict) -> str | None:
    layer = linear.rsplit(".", 2)[0]  # model.layers.i
    norm = (
        f"{layer}.input_layernorm.weight"
        if ".self_attn." in linear
        else f"{layer}.post_attention_layernorm.weight"
    )
    return (
        norm
        if linear.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) and norm in norms
        else None
    )


def _quantize_experts(experts, name, scales, dtype, model, smoothing) -> None:
    layer = name.rsplit(".", 2)[0]
    s = smoothing.get(f"{layer}.post_attention_layernorm.weight")
    if s is not None:
        experts.gate_up_proj.copy_(experts.gate_up_proj.double() * s)
        router = model.get_submodule(f"{layer}.mlp.gate").weight  # reads the smoothed input too
        router.copy_(router.double() * s)
    experts.gate_up_proj.copy_(per_row(experts.gate_up_proj, dtype))
    experts.down_proj.copy_(per_row(experts.down_proj, dtype))
    in_scale = torch.tensor(scales[f"{name}.gate_up_proj"])
    mid_scale = torch.tensor(scales[f"{name}.down_proj"])

    def forward(hidden, top_k_index, top_k_weights):
        hidden = fake_quant(hidden, in_scale, dtype)
        out = torch.zeros_like(hidden)
        for e in range(experts.gate_up_proj.shape[0]):
            token, slot = torch.where(top_k_index == e)
            if len(token) == 0:
                continue
            gate, up = torch.nn.functional.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            mid = fake_quant(torch.nn.functional.silu(gate) * up, mid_scale, dtype)
            out.index_add_(
                0,
                token,
                torch.nn.functional.linear(mid, experts.down_proj[e]) * top_k_weights[token, slot, None],
            )
        return out

    experts.forward = forward
