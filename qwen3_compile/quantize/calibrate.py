"""Calibration statistics, gathered layer by layer.

The calibration tokens' hidden states go through one decoder layer at a time (transformers' own layer
module, built with that layer's weights only), so memory holds one layer plus the activations; the
output of layer i feeds layer i+1. Recorded per layer, as per-input-channel absolute maxima keyed by the
checkpoint name of the weight that reads the activation:

- q/k/v_proj: the input RMSNorm's output; o_proj: the attention context;
- dense gate/up_proj (and the MoE router): the post-attention RMSNorm's output; down_proj: silu(gate)*up;
- MoE experts: `experts.gate_up_proj` over the tokens routed to any expert, `experts.down_proj` over
  every expert's intermediate (one activation range shared by all experts of a projection), plus how
  many tokens each expert received;
- the KV cache: key (after q/k-norm and RoPE: the pair norm bounds every rotation) and value maxima.

With `sample=True` (AWQ's scale search) each layer also keeps the activations themselves, by input
(`attn_in`, `o_in`, `mlp_in`, `down_in`; MoE `expert_in/<e>` and `expert_mid/<e>` over the tokens routed
to expert e), for `on_layer(index, layer, stats)` to use before the layer is dropped; they are then freed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.quantize.calibration_data import CalibrationSet

WeightLookup = Callable[[str], np.ndarray]  # ONNX initializer name -> array


@dataclass
class LayerStats:
    act_amax: dict[str, np.ndarray] = field(default_factory=dict)
    expert_tokens: np.ndarray | None = None  # [E] tokens routed to each expert
    key_amax: float = 0.0
    value_amax: float = 0.0
    samples: dict[str, list] | None = None  # input -> activation rows (torch), kept only when sampling

    def sample(self, key: str, x) -> None:
        if self.samples is not None:
            self.samples.setdefault(key, []).append(x.detach().reshape(-1, x.shape[-1]).float().clone())

    def observe(self, name: str, x) -> None:
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).double().numpy()
        self.act_amax[name] = np.maximum(self.act_amax[name], amax) if name in self.act_amax else amax


@dataclass
class CalibrationStats:
    layers: list[LayerStats]
    calibration: CalibrationSet
    smoothing: dict[str, np.ndarray] = field(default_factory=dict)  # norm weight -> SmoothQuant s
    awq: dict[str, np.ndarray] = field(default_factory=dict)  # AWQ scales by what they scale (awq.py)

    def act_amax(self, weight_name: str) -> np.ndarray:
        layer = int(weight_name.split(".")[2])
        return self.layers[layer].act_amax[weight_name]

    def unreached_experts(self) -> dict[int, list[int]]:
        unreached = {
            i: np.flatnonzero(s.expert_tokens == 0).tolist()
            for i, s in enumerate(self.layers)
            if s.expert_tokens is not None
        }
        return {i: experts for i, experts in unreached.items() if experts}

    def summary(self) -> dict:
        data = {**self.calibration.to_dict(), "layers": len(self.layers)}
        if self.layers and self.layers[0].expert_tokens is not None:
            data["experts_reached"] = [int((s.expert_tokens > 0).sum()) for s in self.layers]
            data["unreached_experts"] = {str(k): v for k, v in self.unreached_experts().items()}
        data["kv_amax"] = [[s.key_amax, s.value_amax] for s in self.layers]
        return data

    def save(self, path: Path) -> None:
        """safetensors (no pickle): act_amax/<weight> (of the input as quantized, after smoothing),
        expert_tokens/<layer>, kv_amax, smoothquant/<norm weight> (the s each norm was divided by)."""
        from safetensors.numpy import save_file

        tensors = {}
        for i, s in enumerate(self.layers):
            tensors |= {f"act_amax/{k}": v.astype(np.float32) for k, v in s.act_amax.items()}
            if s.expert_tokens is not None:
                tensors[f"expert_tokens/{i}"] = s.expert_tokens.astype(np.int64)
        tensors |= {f"smoothquant/{k}": v.astype(np.float64) for k, v in self.smoothing.items()}
        tensors |= {f"awq/{k}": v.astype(np.float64) for k, v in self.awq.items()}
        tensors["kv_amax"] = np.array([[s.key_amax, s.value_amax] for s in self.layers], np.float32)
        save_file(tensors, str(path))


def _layer_module(arch: Qwen3Arch, index: int, weights: WeightLookup):
    import torch
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    config = arch.to_transformers_config()
    config._attn_implementation = "eager"  # explicit causal mask below; no kernel-specific numerics
    config._experts_implementation = "eager"
    cls = Qwen3MoeDecoderLayer if arch.is_moe else Qwen3DecoderLayer
    with torch.device("meta"):
        layer = cls(config, index)
    state = {}
    for key, param in layer.state_dict().items():
        name = f"model.layers.{index}.{key}"
        try:
            array = weights(name)
        except KeyError:
            array = weights(name + ".T").T  # linear weights are stored [in, out]
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(param.shape)
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def _pair_norm_amax(x) -> float:
    """max over (j, j + D/2) pairs of |(x_j, x_{j+D/2})|: the largest |value| any RoPE rotation gives."""
    half = x.shape[-1] // 2
    return float((x[..., :half].square() + x[..., half:].square()).sqrt().max())


def _observing_experts(experts, stats: LayerStats, prefix: str):
    """A forward for transformers' eager `Qwen3MoeExperts` that records the expert statistics on its way:
    the same operations in the same order (experts ascending, each expert's pairs in (slot, token) order,
    `index_add_` into zeros), so the layer's output is unchanged, while every expert's SwiGLU product is
    computed once (a separate statistics pass would compute gate_up a second time: 2/3 of the FLOPs)."""
    import torch

    def forward(hidden_states, top_k_index, top_k_weights):
        num_experts = experts.gate_up_proj.shape[0]
        counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).numpy()
        stats.expert_tokens = counts if stats.expert_tokens is None else stats.expert_tokens + counts
        stats.observe(prefix + "experts.gate_up_proj", hidden_states)  # every token goes to k experts
        stats.sample("mlp_in", hidden_states)
        out = torch.zeros_like(hidden_states)
        by_slot = top_k_index.T  # [k, N]
        for e in np.flatnonzero(counts).tolist():
            top_k_pos, token_idx = torch.where(by_slot == e)
            gate, up = torch.nn.functional.linear(hidden_states[token_idx], experts.gate_up_proj[e]).chunk(
                2, dim=-1
            )
            product = experts.act_fn(gate) * up
            stats.observe(prefix + "experts.down_proj", product)
            stats.sample(f"expert_in/{e}", hidden_states[token_idx])
            stats.sample(f"expert_mid/{e}", product)
            y = torch.nn.functional.linear(product, experts.down_proj[e])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out

    return forward


class _Patched:
    """Undoes an instance attribute set over a module's method (the hooks' `remove()` interface)."""

    def __init__(self, module, name: str, value):
        self.module, self.name = module, name
        setattr(module, name, value)

    def remove(self) -> None:
        delattr(self.module, self.name)
        self.module = None  # the caller may keep this handle past the layer: it must not keep the weights


def _hooks(layer, index: int, arch: Qwen3Arch, stats: LayerStats) -> list:
    p = f"model.layers.{index}."
    attn, mlp = layer.self_attn, layer.mlp

    def observe_input(*names: str, sample: str):
        def hook(module, args):
            for name in names:
                stats.observe(name, args[0])
            stats.sample(sample, args[0])

        return hook

    def keys(module, args, output):
        stats.key_amax = max(stats.key_amax, _pair_norm_amax(output))

    def values(module, args, output):
        stats.value_amax = max(stats.value_amax, float(output.abs().max()))

    attn_names = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
    handles = [
        attn.q_proj.register_forward_pre_hook(observe_input(*attn_names, sample="attn_in")),
        attn.o_proj.register_forward_pre_hook(observe_input(p + "self_attn.o_proj.weight", sample="o_in")),
        attn.k_norm.register_forward_hook(keys),
        attn.v_proj.register_forward_hook(values),
    ]
    if arch.is_moe:
        handles += [
            mlp.gate.register_forward_pre_hook(observe_input(p + "mlp.gate.weight", sample="router_in")),
            _Patched(mlp.experts, "forward", _observing_experts(mlp.experts, stats, p + "mlp.")),
        ]
    else:
        handles += [
            mlp.gate_proj.register_forward_pre_hook(
                observe_input(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", sample="mlp_in")
            ),
            mlp.down_proj.register_forward_pre_hook(
                observe_input(p + "mlp.down_proj.weight", sample="down_in")
            ),
        ]
    return handles


def calibrate(
    arch: Qwen3Arch,
    weights: WeightLookup,
    calibration: CalibrationSet,
    progress: Progress = NO_PROGRESS,
    on_layer: Callable[[int, object, LayerStats], None] | None = None,
) -> CalibrationStats:
    """Run the calibration sequences through the model one layer at a time, recording ranges.
    `on_layer(index, layer module, stats)`: called after each layer with its activation samples (AWQ); when
    it returns True it has replaced the layer's weights (with their quantized values), and the next layer
    reads the replaced layer's output (sequential calibration)."""
    import torch
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    embed = weights("model.embed_tokens.weight")
    rotary = Qwen3RotaryEmbedding(config=arch.to_transformers_config())
    hidden, extras = [], []
    for ids in calibration.sequences:
        positions = torch.arange(len(ids))[None]
        dummy = torch.zeros(1, len(ids), 1)
        mask = torch.full((len(ids), len(ids)), torch.finfo(torch.float32).min).triu(1)[None, None]
        hidden.append(torch.from_numpy(np.asarray(embed[np.asarray(ids)], dtype=np.float32))[None])
        extras.append((mask, positions, rotary(dummy, positions)))
    layers = []
    with torch.inference_mode(), progress.stage("calibrate", total=arch.num_layers) as step:
        for index in range(arch.num_layers):
            layer = _layer_module(arch, index, weights)
            stats = LayerStats(samples={} if on_layer is not None else None)
            handles = _hooks(layer, index, arch, stats)
            inputs = list(hidden)
            for n, (mask, positions, cos_sin) in enumerate(extras):
                hidden[n] = layer(
                    hidden[n], attention_mask=mask, position_ids=positions, position_embeddings=cos_sin
                )
            for handle in handles:
                handle.remove()
            if on_layer is not None:
                if on_layer(index, layer, stats):  # the layer now computes as quantized: feed that on
                    for n, (mask, positions, cos_sin) in enumerate(extras):
                        hidden[n] = layer(
                            inputs[n],
                            attention_mask=mask,
                            position_ids=positions,
                            position_embeddings=cos_sin,
                        )
                stats.samples = None
            layers.append(stats)
            del layer
            step(1)
    return CalibrationStats(layers, calibration)
