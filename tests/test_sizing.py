"""Sizing against independent references: transformers' KV cache tensors and the state dict itself."""

from __future__ import annotations

import pytest
import torch

from qwen3_compile.models.loading import load_model
from qwen3_compile.models.presets import get_preset
from qwen3_compile.models.tensors import expected_shapes
from qwen3_compile.sizing import count_parameters, fit_targets, kv_bytes_per_token, plan_memory, weight_bytes
from qwen3_compile.targets import all_targets, get_target


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_kv_bytes_per_token_matches_transformers_cache(name):
    loaded = load_model(name, dtype=torch.float16)
    tokens = 11
    with torch.no_grad():
        out = loaded.model(torch.randint(0, 1000, (1, tokens)), use_cache=True)
    cache = out.past_key_values
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert kv_bytes_per_token(loaded.arch, "fp16") * tokens == nbytes


def _weight_bytes_from_shapes(arch, precision):
    """Independent count: walk every tensor shape and apply the quantization convention."""
    total = 0
    bits = {"fp8": 8, "int8": 8, "int4": 4}[precision]
    for name, shape in expected_shapes(arch).items():
        numel = torch.Size(shape).numel()
        quantized = shape.__len__() >= 2 and not any(
            k in name for k in ("embed_tokens", "lm_head", "mlp.gate.weight")
        )
        if not quantized:
            total += numel * 2
        elif precision == "int4":
            total += numel // 2 + numel // 128 * 2
        else:
            rows = torch.Size(shape[:-1]).numel()
            total += numel * bits // 8 + rows * 4
    return total


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "qwen3-0.6b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("precision", ["fp8", "int8", "int4"])
def test_quantized_weight_bytes(name, precision):
    arch = get_preset(name, num_layers=2 if name.startswith("qwen3") else None).arch
    assert weight_bytes(arch, precision) == _weight_bytes_from_shapes(arch, precision)
    assert weight_bytes(arch, "fp16") == count_parameters(arch).total * 2


def test_30b_a3b_fits_where_expected():
    arch = get_preset("qwen3-30b-a3b").arch
    fits = {f.target.name: f for f in fit_targets(arch, list(all_targets().values()), context=4096)}
    assert fits["jetson-orin-nano"].best is None  # even int4 (16.7 GB) exceeds 8 GB
    assert fits["jetson-agx-orin"].best == "int8"  # 61 GB fp16 does not fit in 64 GB minus the OS
    assert fits["jetson-agx-orin"].headroom_gb["fp8"] is None  # Orin has no FP8
    assert fits["h200"].best == "fp16"
    # the 32 GB module: INT8 (31 GB of weights) does not fit, INT4 (16.7 GB) does
    assert fits["jetson-agx-orin-32gb"].best == "int4"
    assert (
        fits["jetson-agx-orin-32gb"].headroom_gb["int8"]
        < 0
        < fits["jetson-agx-orin-32gb"].headroom_gb["int4"]
    )
    plan = plan_memory(arch, "int8", context=4096)
    assert plan.kv_cache == 2 * 4096 * 48 * 2 * 4 * 128 * 2  # past + present copies
    assert get_target("jetson-orin-nano").usable_gb < plan.total / 1e9


def test_qwen3_4b_fits_an_orin_nano_only_in_int4_or_int8():
    """The public Jetson tutorials run Qwen3-4B INT4 on an Orin Nano 8 GB; fp16 (8 GB of weights) cannot."""
    arch = get_preset("qwen3-4b").arch
    nano = fit_targets(arch, [get_target("jetson-orin-nano")], context=4096)[0]
    assert nano.headroom_gb["fp16"] < 0 < nano.headroom_gb["int4"]
    assert nano.headroom_gb["int4"] > nano.headroom_gb["int8"]
