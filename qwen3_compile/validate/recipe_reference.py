"""The recipe's own model: the float reference with the artifact's quantization applied in torch.

A quantized artifact is expected to differ from the float model by its recipe's rounding, so its accuracy
gates are loose; a wrong graph (a scaled projection, a wrong scale, a misrouted expert) can hide inside
them. This model computes what a correct artifact computes: the checkpoint's own weights with the recorded
SmoothQuant or AWQ scales folded in (calibration.safetensors), fake-quantized in torch the recipe's way
(symmetric INT8 / E4M3 per output channel, INT4 per group of input channels), with the recorded activation
ranges at every quantized weight's input and the KV-cache ranges on new keys and values. Against it, the
artifact must agree to float rounding; `validate` compares the two on the prompt suite and bisects layers.

What it shares with the quantizer: the fold transforms (the same scales must go to the same weights) and
the calibration ranges. What it does not: the weights (read from the checkpoint, not the graph), the
rounding, the expert loop and the attention, which are torch's and transformers'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.loading import LoadedModel, build_reference_model
from qwen3_compile.quantize.activations import activation_scale
from qwen3_compile.quantize.awq import fake_int4
from qwen3_compile.quantize.recipe import QuantRecipe
from qwen3_compile.quantize.weights import QUANT_MAX, QUANTIZED_DTYPES, Transform
from qwen3_compile.storage.manifest import CALIBRATION_FILE


@dataclass(frozen=True)
class RecipeReference:
    loaded: LoadedModel  # the fake-quantized model (weights replaced, activation hooks registered)
    kv_scales: list[tuple[float, float]] | None  # per layer (key, value) scales of an E4M3 KV cache

    def make_cache(self):
        """A transformers cache that quantizes new keys and values as the artifact's cache does."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.loaded.model.config)
        if self.kv_scales is None:
            return cache
        update, scales = cache.update, self.kv_scales

        def quantizing_update(key, value, layer_idx, *args, **kwargs):
            k_scale, v_scale = scales[layer_idx]
            return update(
                fake_quant(key, k_scale, "fp8"), fake_quant(value, v_scale, "fp8"), layer_idx, *args, **kwargs
            )

        cache.update = quantizing_update
        return cache


def fake_quant(x: torch.Tensor, scale, dtype: str) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear: round half to even and saturate (INT8 [-128, 127], INT4 and E4M3
    symmetric); `scale` broadcasts against x. Computed in fp32 and returned in x's dtype, as a QDQ pair in
    an fp16 graph computes (fp16 in, fp32 arithmetic, fp16 out)."""
    y = x.float() / scale
    if dtype == "fp8":
        q = y.clamp(-QUANT_MAX["fp8"], QUANT_MAX["fp8"]).to(torch.float8_e4m3fn).float()
    else:
        q = torch.round(y).clamp(-128.0 if dtype == "int8" else -QUANT_MAX[dtype], QUANT_MAX[dtype])
    return (q * scale).to(x.dtype)


def fake_quant_weight(
    w: torch.Tensor, recipe: QuantRecipe, scale_dtype=torch.float32, dtype: str | None = None
) -> torch.Tensor:
    """Torch layout ([out, in], experts [E, rows, in]): a scale per output row (per expert), or per group of
    `group_size` input channels for INT4 (AWQ's search uses the same `fake_int4`). Scales are rounded to
    `scale_dtype`, the graph's float type, as the quantizer stores them. `dtype`: another format than the
    recipe's weights' (its lm_head's)."""
    dtype = dtype or recipe.weights.dtype
    if dtype == "int4":
        return fake_int4(w, recipe.weights.group_size, scale_dtype)
    amax = w.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / QUANT_MAX[dtype], torch.ones_like(amax)).to(scale_dtype).float()
    return fake_quant(w, scale, dtype)


def _activation_scale(amax: float, dtype: str, graph_dtype: torch.dtype) -> torch.Tensor:
    stored = np.float16 if graph_dtype == torch.float16 else np.float32
    return torch.from_numpy(activation_scale(amax, dtype, stored)).float()


def _graph_dtype(artifact: Path) -> torch.dtype:
    """The float type the quantizer read the export's weights in and stored its scales in."""
    from qwen3_compile.storage.manifest import read_manifest

    return torch.float16 if read_manifest(artifact).options.dtype == "fp16" else torch.float32


def _read_calibration(artifact: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = artifact / CALIBRATION_FILE
    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BadInputError(
            f"cannot read the calibration record ({err}).", file=path, fix="re-run `qwen3-compile quantize`."
        ) from None
    for name, values in stored.items():
        if not np.isfinite(values).all():
            raise BadInputError(
                "the calibration record holds NaN or Inf.", file=path, field=name, fix="re-run quantize."
            )
    return stored


def _onnx_name(name: str, tensor: torch.Tensor) -> str:
    """The graph's initializer name: linear weights are stored transposed, `<name>.T` ([in, out])."""
    return name + ".T" if tensor.ndim == 2 and not name.endswith("embed_tokens.weight") else name


def _transformed(name: str, tensor: torch.Tensor, transforms: dict[str, Transform]) -> torch.Tensor:
    onnx_name = _onnx_name(name, tensor)
    transform = transforms.get(onnx_name)
    if transform is None:
        return tensor
    layout = tensor.T if onnx_name.endswith(".T") else tensor
    out = torch.from_numpy(np.ascontiguousarray(transform(layout.numpy())))
    return out.T.contiguous() if onnx_name.endswith(".T") else out


def _fold_transforms(recipe: QuantRecipe, arch, calibration: dict[str, np.ndarray]) -> dict[str, Transform]:
    if recipe.smoothquant is not None:
        from qwen3_compile.quantize.smoothquant import recorded_transforms

        prefix = "smoothquant/"
        return recorded_transforms(
            arch, {k[len(prefix) :]: v for k, v in calibration.items() if k.startswith(prefix)}
        )
    if recipe.awq is not None:
        from qwen3_compile.quantize.awq_fold import awq_transforms

        prefix = "awq/"
        try:
            return awq_transforms(
                arch, {k[len(prefix) :]: v for k, v in calibration.items() if k.startswith(prefix)}
            )
        except KeyError as err:
            raise BadInputError(
                f"the calibration record has no AWQ scale {err}.", field="awq", fix="re-run quantize."
            ) from None
    return {}


def _act_amax(calibration: dict[str, np.ndarray], *weights: str) -> float:
    """The range the graph gave the input that `weights` share (the widest of theirs)."""
    try:
        return max(float(calibration[f"act_amax/{w}"].max()) for w in weights)
    except KeyError as err:
        raise BadInputError(
            f"the calibration record has no activation range {err}.",
            field="act_amax",
            fix="re-run `qwen3-compile quantize` (the record and the graph belong together).",
        ) from None


def _hook_linears(
    model, recipe: QuantRecipe, calibration: dict[str, np.ndarray], graph_dtype: torch.dtype
) -> None:
    """Fake-quantize the input of every quantized linear with its recorded per-tensor range."""
    dtype = recipe.activations.dtype
    shared = {
        "q_proj": ("q_proj", "k_proj", "v_proj"),
        "k_proj": ("q_proj", "k_proj", "v_proj"),
        "v_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_proj": ("gate_proj", "up_proj"),
        "up_proj": ("gate_proj", "up_proj"),
    }
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not recipe.select.selects(f"{name}.weight"):
            continue
        parent, leaf = name.rsplit(".", 1)
        readers = [f"{parent}.{r}.weight" for r in shared.get(leaf, (leaf,))]
        readers = [r for r in readers if recipe.select.selects(r)]
        scale = _activation_scale(_act_amax(calibration, *readers), dtype, graph_dtype)
        module.register_forward_pre_hook(lambda m, a, s=scale: (fake_quant(a[0], s, dtype),))
    for name, module in model.named_modules():
        if name.endswith("mlp.experts") and recipe.select.selects(f"{name}.gate_up_proj"):
            hidden = _activation_scale(_act_amax(calibration, f"{name}.gate_up_proj"), dtype, graph_dtype)
            mid = _activation_scale(_act_amax(calibration, f"{name}.down_proj"), dtype, graph_dtype)
            module.forward = _quantized_experts(module, hidden, mid, dtype)


def _quantized_experts(experts, hidden_scale, mid_scale, dtype):
    """transformers' expert loop with the activations quantized where QuantizedExpertDispatch does: the
    hidden input once, the intermediate of every expert with one shared scale."""

    def forward(hidden, top_k_index, top_k_weights):
        hidden = fake_quant(hidden, hidden_scale, dtype)
        out = torch.zeros_like(hidden)
        for e in range(experts.gate_up_proj.shape[0]):
            token, slot = torch.where(top_k_index == e)
            if len(token) == 0:
                continue
            gate, up = torch.nn.functional.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            mid = fake_quant(torch.nn.functional.silu(gate) * up, mid_scale, dtype)
            down = torch.nn.functional.linear(mid, experts.down_proj[e])
            out.index_add_(0, token, (down * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    return forward


def recipe_reference(
    loaded: LoadedModel, artifact: Path, recipe: QuantRecipe, dtype: torch.dtype = torch.float32
) -> RecipeReference | None:
    """The fake-quantized model for a quantized artifact (None for the fp16 baseline, which has nothing to
    fake). `loaded` is the fp32 reference; it is not modified. `dtype` other than fp32 runs the same model
    in that precision (weights fake-quantized in fp32, then rounded to it): validate measures with it how
    far fp16 arithmetic alone moves the recipe's model."""
    if recipe.weights.dtype not in QUANTIZED_DTYPES:
        return None
    arch = loaded.arch
    calibration = _read_calibration(artifact) if recipe.needs_calibration else {}
    transforms = _fold_transforms(recipe, arch, calibration)
    graph_dtype = _graph_dtype(artifact)
    state = {}
    with torch.no_grad():
        for name, tensor in loaded.model.state_dict().items():
            if arch.tie_word_embeddings and name == "lm_head.weight":
                continue
            # the export's weights (fp16 exports round them), folded as the quantizer folds them
            t = _transformed(name, tensor.detach().cpu().to(graph_dtype).clone(), transforms).float()
            if t.ndim >= 2 and recipe.select.selects(name) and name != "lm_head.weight":
                t = fake_quant_weight(t, recipe, graph_dtype)
            state[name] = t
        head = recipe.weights.lm_head
        if head != "float":  # tied: a quantized copy projects, the gather keeps the float table (weights.py)
            source = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
            state["lm_head.weight"] = fake_quant_weight(state[source], recipe, graph_dtype, head)
            arch = dataclasses.replace(arch, tie_word_embeddings=False)
    model = build_reference_model(arch, state, dtype)
    if recipe.activations is not None:
        _hook_linears(model, recipe, calibration, graph_dtype)
    kv_scales = None
    if recipe.kv_cache is not None:
        kv = calibration.get("kv_amax")
        if kv is None or kv.shape != (arch.num_layers, 2):
            raise BadInputError(
                "the calibration record has no per-layer KV-cache ranges.",
                file=artifact / CALIBRATION_FILE,
                field="kv_amax",
                fix="re-run `qwen3-compile quantize` with the KV-cache recipe.",
            )
        dtype = recipe.kv_cache.dtype
        kv_scales = [
            (_activation_scale(float(k), dtype, graph_dtype), _activation_scale(float(v), dtype, graph_dtype))
            for k, v in kv
        ]
    return RecipeReference(LoadedModel(loaded.source, model), kv_scales)


class RecipeRunner:
    """The recipe reference as a runner (backends.base.CausalLMRunner), with its quantizing KV cache."""

    name = "pytorch-fake-quant"

    def __init__(self, reference: RecipeReference):
        from qwen3_compile.backends.torch_reference import TorchRunner

        self.reference = reference
        self._runner = TorchRunner(reference.loaded)

    def empty_cache(self, batch: int):
        return self.reference.make_cache()

    def forward(self, input_ids, attention_mask, position_ids, cache):
        return self._runner.forward(input_ids, attention_mask, position_ids, cache)
