"""The ONNX node contract of the qmoe TensorRT plugin, shared by the C++ and the Python plugin.

A lowering replaces `qwen3_compile::ExpertDispatch` by one node that TensorRT's ONNX parser imports as a
plugin: its op_type is the plugin name, and the attributes `plugin_version` / `plugin_namespace` pick the
creator from the plugin registry. The node's other attributes reach the creator as plugin fields.

    Qwen3MoE(hidden [N, H], router_logits [N, E], gate_up_weight [E, 2I, H], down_weight [E, H, I]
             [, gate_up_scale, down_scale]) -> output [N, H]

Weights in the hidden dtype (4 inputs), or weight-only quantized with their scales (6 inputs): int8 with
scales [E, 2I], [E, H] (one per output row), or int4 (kINT4: two values a byte, low nibble first along the
input axis) with scales [E, 2I, H/G], [E, H, I/G] (one per group of G input channels, G in
INT4_GROUP_SIZES, taken from the shapes). Scales fp32 or fp16.

Pure Python and onnx only: no TensorRT, no torch, no CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

PLUGIN_NAME = "Qwen3MoE"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "qwen3_compile"
#: ONNX domain of the node. TensorRT's parser looks plugins up by op_type alone; the domain only keeps the
#: node out of the default opset for other tools.
NODE_DOMAIN = "trt.plugins"
# what an engine's manifest records when its plugin layers call back into the project's Python plugin
PYTHON_PLUGIN = "python:qwen3_compile.kernels.trt_python_plugin"

INPUTS = ("hidden", "router_logits", "gate_up_weight", "down_weight", "gate_up_scale", "down_scale")
OUTPUTS = ("output",)
#: Node attributes besides plugin_version / plugin_namespace (= the plugin's serialised fields).
ATTRIBUTES = {"top_k": "int", "normalize": "int (0 or 1): Qwen3's norm_topk_prob", "activation": "'silu'"}

#: Kernel limits (plugins/moe/qmoe.h): checked when the plugin is created and configured.
MAX_EXPERTS = 256
MAX_TOP_K = 32
HIDDEN_MULTIPLE = 128
INTER_MULTIPLE = 64
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class MoeAttributes:
    """The plugin's fields: what the node's attributes carry and what an engine serialises."""

    top_k: int
    normalize: bool = True
    activation: str = "silu"

    def check(self) -> None:
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"{PLUGIN_NAME}: top_k must be in 1..{MAX_TOP_K}, got {self.top_k}")
        if self.activation != "silu":
            raise ValueError(f"{PLUGIN_NAME}: activation must be 'silu' (SwiGLU), got {self.activation!r}")


def check_shapes(num_experts: int, hidden: int, inter: int, top_k: int) -> None:
    """Raise ValueError when the kernels do not support this layer (qmoe_check_problem's static part)."""
    problems = []
    if not 1 <= num_experts <= MAX_EXPERTS:
        problems.append(f"experts {num_experts} not in 1..{MAX_EXPERTS}")
    if top_k > num_experts:
        problems.append(f"top_k {top_k} > experts {num_experts}")
    if hidden % HIDDEN_MULTIPLE:
        problems.append(f"hidden {hidden} not a multiple of {HIDDEN_MULTIPLE}")
    if inter % INTER_MULTIPLE:
        problems.append(f"moe intermediate {inter} not a multiple of {INTER_MULTIPLE}")
    if problems:
        raise ValueError(f"{PLUGIN_NAME}: unsupported layer: {'; '.join(problems)}")


def _align256(n: int) -> int:
    return (n + 255) // 256 * 256


def workspace_bytes(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int) -> int:
    """qmoe_workspace_size() for these sizes, plus 256 bytes so the plugin can align the pointer it gets.

    Mirrors `layout_workspace` in plugins/moe/qmoe_internal.cuh; tests/kernels/test_compile.py checks the
    two agree.
    """
    P, E = num_tokens * top_k, num_experts
    max_tiles = P // 64 + min(E, P)
    routing_blocks = (num_tokens + 7) // 8  # route.cu: kTokPerBlock tokens a router block
    # ids, weights, offsets, meta, active, perm_pair, pair_pos, tile map, per-block expert counts, h, y
    parts = [
        P * 4,
        P * 4,
        (E + 1) * 4,
        16,
        E * 4,
        P * 4,
        P * 4,
        max_tiles * 16,
        E * routing_blocks * 4,
        P * inter * 2,
        P * hidden * 2,
    ]
    return sum(_align256(p) for p in parts) + 256


def make_node(
    inputs: list[str],
    output: str,
    attributes: MoeAttributes,
    name: str | None = None,
):
    """The plugin's ONNX node (4 inputs, or 6 with INT8/INT4 weights and their scales)."""
    import onnx.helper

    if len(inputs) not in (4, 6):
        raise ValueError(f"{PLUGIN_NAME} takes 4 inputs (float weights) or 6 (int8/int4 weights + scales)")
    attributes.check()
    return onnx.helper.make_node(
        PLUGIN_NAME,
        inputs,
        [output],
        name=name,
        domain=NODE_DOMAIN,
        plugin_version=PLUGIN_VERSION,
        plugin_namespace=PLUGIN_NAMESPACE,
        top_k=attributes.top_k,
        normalize=int(attributes.normalize),
        activation=attributes.activation,
    )
