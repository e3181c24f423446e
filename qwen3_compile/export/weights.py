"""Where the exporter's weights come from, in the order it writes them, one group at a time.

The export writes its initializers in groups: the embeddings, then each decoder layer, then the final
norm and `lm_head`. A weight source hands over one group's tensors at a time, so only one layer's weights
(at most) are ever in memory:

- `StateDictSource`: tensors already in memory (a loaded reference model), written whole.
- `PresetSource`: a preset's random weights, generated tensor by tensor.
- `CheckpointSource`: a safetensors checkpoint, streamed in row blocks of at most `CHUNK_BYTES` straight
  into the external-data file; per-expert matrices are written in place as the fused `[E, 2I, H]` /
  `[E, H, I]` tensors, and transposed weights are written block by block, so no fused or transposed
  copy of a large tensor exists. Small models (no external data) get the same tensors inline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from qwen3_compile.errors import BadInputError
from qwen3_compile.export.builder import GraphBuilder
from qwen3_compile.models.checkpoint import has_nonfinite
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.safetensors_index import ShardReader, TensorEntry
from qwen3_compile.models.tensors import ExpertLayout, layer_shapes, per_expert_names
from qwen3_compile.storage.external_data import MIN_EXTERNAL_BYTES, raw_view

if TYPE_CHECKING:
    import torch

    from qwen3_compile.models.checkpoint import Checkpoint

CHUNK_BYTES = 64 << 20  # row blocks read, converted and written at a time
EMBEDDINGS = "model.embed_tokens.weight"


@dataclass(frozen=True)
class WeightPlan:
    """One initializer: its name in the graph, the (fused-layout) tensor it comes from, and how."""

    name: str
    source: str
    shape: tuple[int, ...]  # the source tensor's shape
    transpose: bool  # linear weights are stored [in, out] (name suffix `.T`)
    keep_fp32: bool  # the MoE router stays fp32 whatever the export dtype (see layers.sparse_moe)

    @property
    def dims(self) -> list[int]:
        return list(reversed(self.shape)) if self.transpose else list(self.shape)

    def dtype(self, export_dtype: torch.dtype) -> torch.dtype:
        import torch

        return torch.float32 if self.keep_fp32 else export_dtype

    def nbytes(self, export_dtype: torch.dtype) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * self.dtype(export_dtype).itemsize


def _plan(name: str, shape: tuple[int, ...]) -> WeightPlan:
    linear = len(shape) == 2 and name.endswith(".weight") and name != EMBEDDINGS
    return WeightPlan(name + ".T" if linear else name, name, shape, linear, name.endswith("mlp.gate.weight"))


def weight_groups(arch: Qwen3Arch) -> list[list[WeightPlan]]:
    """The weights in write order: [embeddings], one group per decoder layer, [final norm, lm_head]."""
    h = arch.hidden_size
    groups = [[_plan(EMBEDDINGS, (arch.vocab_size, h))]]
    for i in range(arch.num_layers):
        groups.append([_plan(n, s) for n, s in sorted(layer_shapes(arch, i).items())])
    last = [_plan("model.norm.weight", (h,))]
    if not arch.tie_word_embeddings:
        last.append(_plan("lm_head.weight", (arch.vocab_size, h)))
    return [*groups, last]


def external_bytes(groups: list[list[WeightPlan]], export_dtype: torch.dtype) -> int:
    """Bytes the groups take in the external-data file (with alignment padding, an upper bound)."""
    from qwen3_compile.storage.external_data import ALIGNMENT

    sizes = [p.nbytes(export_dtype) for g in groups for p in g]
    return sum(n + ALIGNMENT for n in sizes if n >= MIN_EXTERNAL_BYTES)


class WeightSource(Protocol):
    def emit(self, b: GraphBuilder, plan: WeightPlan, export_dtype: torch.dtype) -> None:
        """Add `plan`'s initializer to `b` (through its weight sink when it has one)."""

    def end_group(self) -> None:
        """The group's weights are written: release what was held for it."""


def _converted(tensor: torch.Tensor, plan: WeightPlan, export_dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.to(plan.dtype(export_dtype))
    return tensor.t() if plan.transpose else tensor


def _skipped(b: GraphBuilder, plan: WeightPlan, export_dtype: torch.dtype) -> bool:
    """On resume, a weight the data file already holds is re-described without producing it."""
    sink, nbytes = b.weight_sink, plan.nbytes(export_dtype)
    if sink is None or nbytes < MIN_EXTERNAL_BYTES or sink.offset >= sink.resume_from:
        return False
    from qwen3_compile.graph_contract import ONNX_DTYPES

    elem_type = ONNX_DTYPES[str(plan.dtype(export_dtype)).removeprefix("torch.")]
    proto, at = sink.reserve(plan.name, elem_type, plan.dims, nbytes)
    assert at is None, f"resume point inside the weights of '{plan.name}'"
    b.add_initializer(proto)
    return True


class StateDictSource:
    """Weights in memory (fused expert layout)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def emit(self, b: GraphBuilder, plan: WeightPlan, export_dtype: torch.dtype) -> None:
        b.weight(plan.name, _converted(self.state[plan.source], plan, export_dtype))

    def end_group(self) -> None:
        pass


class PresetSource:
    """A preset's deterministic random weights, generated one tensor at a time."""

    def __init__(self, arch: Qwen3Arch, seed: int, outliers=None):
        self.arch, self.seed, self.outliers = arch, seed, outliers

    def emit(self, b: GraphBuilder, plan: WeightPlan, export_dtype: torch.dtype) -> None:
        from qwen3_compile.models.loading import random_tensor

        if not _skipped(b, plan, export_dtype):
            tensor = random_tensor(self.arch, plan.source, plan.shape, self.seed, self.outliers)
            b.weight(plan.name, _converted(tensor, plan, export_dtype))

    def end_group(self) -> None:
        pass


class CheckpointSource:
    """Streams a validated safetensors checkpoint; refuses NaN/Inf unless `allow_nonfinite`."""

    def __init__(self, ckpt: Checkpoint, allow_nonfinite: bool = False):
        self.ckpt, self.allow_nonfinite = ckpt, allow_nonfinite
        self.reader = ShardReader()
        # imported quantized checkpoints: graph weight -> its DequantizeLinear output (export/imported.py)
        self.dequantized: dict[str, str] = {}

    def _imported(self, plan: WeightPlan) -> list[list[str]] | str | None:
        """The quantized checkpoint linears behind `plan`, or None when it is stored in float."""
        quant = self.ckpt.quantization
        if quant is None:
            return None
        if plan.source in quant.linears:
            return plan.source
        if ".mlp.experts." not in plan.source:
            return None
        layer = int(plan.source.split(".")[2])
        per_expert = [per_expert_names(layer, e) for e in range(self.ckpt.arch.num_experts)]
        if plan.source.endswith("gate_up_proj"):
            names = [[gate, up] for gate, up, _ in per_expert]
        else:
            names = [[down] for _, _, down in per_expert]
        return names if names[0][0] in quant.linears else None

    def _pieces(self, plan: WeightPlan) -> list[TensorEntry]:
        """The stored tensors whose rows, in order, make up `plan.source` viewed as 2-D."""
        tensors = self.ckpt.tensors
        if self.ckpt.expert_layout is ExpertLayout.PER_EXPERT and ".mlp.experts." in plan.source:
            layer = int(plan.source.split(".")[2])
            per_expert = [per_expert_names(layer, e) for e in range(self.ckpt.arch.num_experts)]
            if plan.source.endswith("gate_up_proj"):  # [E, 2I, H]: gate_e then up_e, expert by expert
                return [tensors[n] for gate, up, _ in per_expert for n in (gate, up)]
            return [tensors[down] for _, _, down in per_expert]  # [E, H, I]
        return [tensors[plan.source]]

    def _rows(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        block = self.reader.read_rows(entry, start, stop)
        if not self.allow_nonfinite and has_nonfinite(block):
            raise BadInputError(
                f"tensor '{entry.name}' contains NaN or Inf values.",
                file=entry.file,
                field=entry.name,
                fix="the checkpoint is damaged (re-download it); pass --allow-nonfinite to use it anyway.",
            )
        return block

    def emit(self, b: GraphBuilder, plan: WeightPlan, export_dtype: torch.dtype) -> None:
        import torch

        imported = self._imported(plan)
        if imported is not None:  # its own values and scales behind DequantizeLinear
            from qwen3_compile.export.imported import emit_imported

            self.dequantized[plan.name] = emit_imported(b, plan.name, self.ckpt.quantization, imported)
            return
        if _skipped(b, plan, export_dtype):
            return
        pieces = self._pieces(plan)
        nbytes = plan.nbytes(export_dtype)
        if b.weight_sink is None or nbytes < MIN_EXTERNAL_BYTES:  # small: the whole tensor, inline
            rows = [self._rows(e, 0, _num_rows(e)) for e in pieces]
            tensor = torch.cat(rows).reshape(plan.shape)
            b.weight(plan.name, _converted(tensor, plan, export_dtype))
            return
        from qwen3_compile.graph_contract import ONNX_DTYPES

        dtype = plan.dtype(export_dtype)
        proto, at = b.weight_sink.reserve(
            plan.name, ONNX_DTYPES[str(dtype).removeprefix("torch.")], plan.dims, nbytes
        )
        if plan.transpose:
            self._write_transposed(b.weight_sink, at, pieces[0], dtype)
        else:
            for entry in pieces:
                at = self._write_rows(b.weight_sink, at, entry, dtype)
        b.add_initializer(proto)

    def _write_rows(self, sink, at: int, entry: TensorEntry, dtype: torch.dtype) -> int:
        rows, row_bytes = _num_rows(entry), _row_bytes(entry, dtype)
        step = max(1, CHUNK_BYTES // row_bytes)
        for start in range(0, rows, step):
            data = raw_view(self._rows(entry, start, min(rows, start + step)).to(dtype))[0]
            sink.write_at(at, data)
            at += data.nbytes
        return at

    def _write_transposed(self, sink, at: int, entry: TensorEntry, dtype: torch.dtype) -> None:
        """Source [R, C] -> stored [C, R]: each block of source rows fills a column band of every output
        row, written in place, so only one block is in memory."""
        rows, cols = entry.shape
        itemsize = dtype.itemsize
        step = max(1, CHUNK_BYTES // _row_bytes(entry, dtype))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = self._rows(entry, start, stop).to(dtype).t().contiguous()  # [C, stop - start]
            data = raw_view(block)[0]
            if stop - start == rows:
                sink.write_at(at, data)
                return
            band = (stop - start) * itemsize
            for c in range(cols):
                sink.write_at(at + (c * rows + start) * itemsize, data[c * band : (c + 1) * band])

    def end_group(self) -> None:
        self.reader.close()  # reopened per layer: a shard that disappears is noticed, not read stale


def _num_rows(entry: TensorEntry) -> int:
    rows = 1
    for d in entry.shape[:-1]:
        rows *= d
    return rows


def _row_bytes(entry: TensorEntry, dtype: torch.dtype) -> int:
    from qwen3_compile.models.safetensors_index import DTYPE_BYTES

    cols = entry.shape[-1] if entry.shape else 1
    return cols * max(DTYPE_BYTES[entry.dtype], dtype.itemsize)
