"""What the ONNX Runtime CUDA measurements run on: the artifacts (export settings per model and dtype),
the PyTorch models they are checked against, and the provider settings compared."""

from __future__ import annotations

from dataclasses import dataclass

SLICE = "qwen3-30b-a3b"


Q06 = "qwen3-0.6b"  # its 2-layer slice (dense)


@dataclass(frozen=True)
class Spec:
    preset: str
    dtype: str
    lowered_from: str | None = None  # `lower --for ort` of this artifact
    layers: int | None = None
    moe_lowering: str | None = None  # custom-op: the norms fused, ExpertDispatch kept for --ort-ops
    attention: str = "standard"  # gqa: `lower --attention gqa` (GroupQueryAttention, static cache)
    logits: str = "all"  # last: `lower --logits last` (a deployment graph: run, bench; not validate)

    @property
    def keeps_expert_dispatch(self) -> bool:
        return self.lowered_from is None or self.moe_lowering == "custom-op"

    @property
    def model(self) -> str:
        if self.preset != SLICE:
            return self.preset
        return "slice" if self.layers == 2 else f"slice{self.layers}"


ARTIFACTS = {
    "tiny-dense-fp32": Spec("tiny-dense", "fp32"),
    "tiny-dense-fp16": Spec("tiny-dense", "fp16"),
    "tiny-dense-bf16": Spec("tiny-dense", "bf16"),
    "tiny-moe-fp32": Spec("tiny-moe", "fp32"),
    "tiny-moe-fp16": Spec("tiny-moe", "fp16"),
    "tiny-moe-fp32-ort": Spec("tiny-moe", "fp32", "tiny-moe-fp32"),
    "slice-fp32": Spec(SLICE, "fp32", layers=2),
    "slice-fp32-ort": Spec(SLICE, "fp32", "slice-fp32", layers=2),
    "slice-fp16": Spec(SLICE, "fp16", layers=2),
    # decode speed at depth: 8 layers, where per-layer work outweighs the per-step fixed costs
    "slice8-fp16": Spec(SLICE, "fp16", layers=8),
    "slice8-fp16-norm": Spec(SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="custom-op"),
    # ORT's own fp16 MoE (CUDA) with the norms fused: the comparator of our custom op
    "slice8-fp16-moe": Spec(SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="ort-moe"),
    "slice8-fp16-moe-gqa": Spec(
        SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="ort-moe", attention="gqa"
    ),
    # GroupQueryAttention, for the static cache and CUDA graph rows of bench
    "tiny-dense-fp16-gqa": Spec("tiny-dense", "fp16", "tiny-dense-fp16", attention="gqa"),
    "tiny-moe-fp16-gqa": Spec("tiny-moe", "fp16", "tiny-moe-fp16", attention="gqa"),
    "slice8-fp16-gqa": Spec(SLICE, "fp16", "slice8-fp16", layers=8, attention="gqa"),
    "slice8-fp16-norm-gqa": Spec(
        SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="custom-op", attention="gqa"
    ),
    # deployment graphs (`--logits last`): the same decode step; the prefill computes and copies one row
    "slice8-fp16-norm-gqa-last": Spec(
        SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="custom-op", attention="gqa", logits="last"
    ),
    "slice8-fp16-moe-gqa-last": Spec(
        SLICE, "fp16", "slice8-fp16", layers=8, moe_lowering="ort-moe", attention="gqa", logits="last"
    ),
    # GPU parity (validate-matrix): every model in fp16 and bf16, MoE through the ExpertDispatch body, our
    # custom op (the canonical graph with --ort-ops) and ORT's MoE (`--moe-lowering ort-moe`)
    "tiny-moe-bf16": Spec("tiny-moe", "bf16"),
    "tiny-moe-fp16-moe": Spec("tiny-moe", "fp16", "tiny-moe-fp16", moe_lowering="ort-moe"),
    "tiny-moe-bf16-moe": Spec("tiny-moe", "bf16", "tiny-moe-bf16", moe_lowering="ort-moe"),
    "q06-fp16": Spec(Q06, "fp16", layers=2),
    "q06-bf16": Spec(Q06, "bf16", layers=2),
    "slice8-bf16": Spec(SLICE, "bf16", layers=8),
    "slice8-bf16-moe": Spec(SLICE, "bf16", "slice8-bf16", layers=8, moe_lowering="ort-moe"),
}


MODELS = {
    "tiny-dense": ("tiny-dense", None),
    "tiny-moe": ("tiny-moe", None),
    "slice": (SLICE, 2),
    "slice8": (SLICE, 8),
    Q06: (Q06, 2),
}


TORCH_VARIANTS = ("cpu-fp32", "cuda-fp32", "cuda-fp32-tf32", "cuda-fp16")


# name -> (device, use_tf32, graph optimization level; None: the artifact's recorded one)
ORT_CONFIGS = {
    "ort-cpu": ("cpu", "0", None),
    "ort-cuda": ("cuda", "0", None),
    "ort-cuda-tf32": ("cuda", "1", None),
    "ort-cuda-basic": ("cuda", "0", "basic"),  # ORT's fusions (RMSNorm, GELU/SiLU, ...) off
}
