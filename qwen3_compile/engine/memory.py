"""Will the engine fit the target? Checked before anything is built, with the numbers in the error.

Weights are the bytes of the artifact's initializers as they are stored (an fp32 export builds an fp32
engine; a QDQ artifact keeps its INT8/FP8 weights), the KV cache is sized at --max-batch x --max-seq
in the graph's cache type, twice (a call reads past_key_values.* and writes present.*), and activations
are the peak of one layer for the largest prefill plus the fp32 logits of every position (the validation
graph) or of the last one (`--logits last`, see `sizing.activation_bytes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.sizing import GB, KV_COPIES, activation_bytes, kv_bytes_per_token
from qwen3_compile.targets import Target


@dataclass(frozen=True)
class EngineMemory:
    weights: int
    kv_cache: int
    activations: int
    usable: int  # the target's memory minus what the OS/CUDA context/runtime keep

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def to_dict(self) -> dict:
        return asdict(self) | {"total": self.total, "fits": self.fits}

    def describe(self) -> str:
        return (
            f"weights {self.weights / GB:.2f} GB + KV cache (past + present) {self.kv_cache / GB:.2f} GB "
            f"+ activations {self.activations / GB:.2f} GB = {self.total / GB:.2f} GB against "
            f"{self.usable / GB:.2f} GB usable"
        )


def stored_weight_bytes(model_path: Path) -> int:
    """Bytes of the model file and its external data (the weights dominate both)."""
    files = [model_path, *model_path.parent.glob(model_path.name + ".data")]
    return sum(f.stat().st_size for f in files if f.exists())


def plan_engine_memory(
    arch: Qwen3Arch,
    target: Target,
    weights: int,
    max_batch: int,
    max_seq: int,
    kv_bytes: int,
    all_logits: bool = True,
) -> EngineMemory:
    # kv_bytes: bytes per cached element (4 for an fp32 graph, 2 for fp16)
    kv = KV_COPIES * max_batch * max_seq * kv_bytes_per_token(arch, "fp16") // 2 * kv_bytes
    layer = activation_bytes(arch, max_seq, max_seq) - arch.vocab_size * 4  # its logits: last token only
    logits = (max_seq if all_logits else 1) * arch.vocab_size * 4
    return EngineMemory(weights, kv, max_batch * (layer + logits), int(target.usable_gb * GB))


def check_fits(memory: EngineMemory, target: Target, max_batch: int, max_seq: int) -> None:
    if memory.fits:
        return
    short = (memory.total - memory.usable) / GB
    raise BadInputError(
        f"the engine does not fit {target.name} ({target.description}): {memory.describe()}, "
        f"{short:.2f} GB short at --max-batch {max_batch} --max-seq {max_seq}.",
        field="--target",
        fix="lower --max-batch/--max-seq, quantize (a recipe from recipes/quant/), or pick a larger target.",
    )
