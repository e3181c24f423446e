"""Calibration's expert forward (which records the statistics while it computes) against transformers' own
eager `Qwen3MoeExperts`: the same output bits, and the recorded ranges equal those of a separate pass."""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from qwen3_compile.models.presets import get_preset
from qwen3_compile.quantize.calibrate import LayerStats, _observing_experts


def test_observing_experts_forward_is_transformers_eager_bit_for_bit():
    config = get_preset("tiny-moe").arch.to_transformers_config()
    config._experts_implementation = "eager"
    experts = Qwen3MoeExperts(config)
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.1)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.1)
    n, k, e = 37, config.num_experts_per_tok, config.num_experts
    hidden = torch.randn(n, config.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    ids[:, 0] = 3  # one expert receives every token
    weights = torch.rand(n, k, generator=gen)

    stats = LayerStats()
    with torch.inference_mode():
        got = _observing_experts(experts, stats, "p.")(hidden, ids, weights)
        want = experts(hidden, ids, weights)
    assert torch.equal(got, want)

    counts = torch.bincount(ids.reshape(-1), minlength=e).numpy()
    np.testing.assert_array_equal(stats.expert_tokens, counts)
    np.testing.assert_array_equal(stats.act_amax["p.experts.gate_up_proj"], hidden.abs().amax(0).numpy())
    # the down projection's input over every expert's tokens, from a separate pass
    products = []
    for x in range(e):
        rows = (ids == x).any(dim=1)
        if rows.any():
            gate, up = torch.nn.functional.linear(hidden[rows], experts.gate_up_proj[x].detach()).chunk(
                2, dim=-1
            )
            products.append((torch.nn.functional.silu(gate) * up).abs().amax(0))
    np.testing.assert_allclose(
        stats.act_amax["p.experts.down_proj"], torch.stack(products).amax(0).numpy(), rtol=1e-6
    )
