"""MoE helpers of the lowering tests: the ExpertDispatch node their one-node graphs are built around, and the
positions whose fp16 logits may be compared with the fp32 reference (no near-tied expert choice)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH


def expert_dispatch_node(
    inputs: list[str], output: str, top_k: int, normalize: bool = True, name: str = "experts"
) -> onnx.NodeProto:
    """ExpertDispatch with SiLU experts over `inputs` = hidden, router logits, gate_up, down."""
    return helper.make_node(
        EXPERT_DISPATCH,
        list(inputs),
        [output],
        name=name,
        domain=DOMAIN,
        top_k=top_k,
        normalize=int(normalize),
        activation="silu",
    )


ROUTER_TIE = 1e-2  # fp16 graphs move router logits by ~1e-3: a top-k margin below this may flip an expert


def settled_positions(model, ids: np.ndarray) -> np.ndarray:
    """[batch, positions] True where the logits do not depend on a near-tied expert choice: fp16 rounding
    may route a token whose fp32 top-k router margin (k-th minus (k+1)-th logit) is below ROUTER_TIE to
    another expert, moving its logits by several units (measured: 5 of 300 random draws on tiny-moe, at
    margins of about 2e-3, in the canonical and the GQA graph alike). A near-tie in the last MoE layer
    unsettles its own position; in an earlier one, also every later position of the row (through the
    next layers' attention). All True for a dense model."""
    import torch

    margins, hooks = [], []
    k = getattr(model.config, "num_experts_per_tok", 0)
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if k and gate is not None:
            hooks.append(gate.register_forward_hook(lambda mod, inp, out: margins.append(out[0].detach())))
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids))
    finally:
        for hook in hooks:
            hook.remove()
    settled = np.ones(ids.shape, dtype=bool)
    for index, logits in enumerate(margins):
        top = torch.topk(logits.float().reshape(*ids.shape, -1), k + 1, dim=-1).values
        tied = (top[..., k - 1] - top[..., k]).numpy() < ROUTER_TIE
        settled &= ~tied if index == len(margins) - 1 else ~np.logical_or.accumulate(tied, axis=1)
    return settled
