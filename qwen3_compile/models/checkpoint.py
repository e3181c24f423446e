"""A local Hugging Face Qwen3 checkpoint directory: find its files, validate, then load weights.

`open_checkpoint` reads only config.json and the safetensors headers and checks every tensor's name,
shape and dtype against the architecture, so a bad checkpoint is refused before anything is built.
`load_state_dict` then streams tensors (memory-mapped), refuses NaN/Inf unless allowed, and returns
the state dict in the layout the model code uses (MoE experts fused): what the PyTorch reference needs.
The exporter never loads a state dict: it reads the validated tensors in row blocks, layer by layer
(`safetensors_index.ShardReader`, `export/weights.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.models.quantized import ImportedQuantization, parse_quantization_config, plan_import
from qwen3_compile.models.safetensors_index import FLOAT_DTYPES, TensorEntry, read_header
from qwen3_compile.models.tensors import (
    ExpertLayout,
    detect_expert_layout,
    expected_shapes,
    fused_expert_names,
    per_expert_names,
)
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.storage.user_files import (
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    check_folder,
    check_regular,
    read_json_object,
)

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# tensors some writers add that carry no weights; safe to skip
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

CONVERT_HINT = (
    "convert it once in a trusted environment: `from transformers import AutoModelForCausalLM; "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`, then "
    "point qwen3-compile at OUT. Pickle files can run arbitrary code, so qwen3-compile never opens them."
)


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    arch: Qwen3Arch
    tensors: dict[str, TensorEntry]
    expert_layout: ExpertLayout
    files: tuple[Path, ...]
    # a published quantized checkpoint (FP8, AWQ, GPTQ): which weights are stored quantized, and how
    quantization: ImportedQuantization | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}


def _shard_index(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor -> shard file name). Shards must be plain file names beside the
    index: a path elsewhere (absolute, `..`, a sub-folder) would make us read files outside the checkpoint."""
    fix = "re-save the checkpoint with save_pretrained."
    data = read_json_object(index, MAX_INDEX_BYTES, fix, fix)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(
            "the shard index needs a non-empty 'weight_map' object (tensor name -> shard file).",
            file=index,
            field="weight_map",
            fix=fix,
        )
    for name, shard in weight_map.items():
        if not _is_shard_name(shard):
            raise BadInputError(
                f"the index places tensor '{name}' in {shard!r}, which is not a shard file name: shards "
                f"are plain '*.safetensors' file names in the checkpoint folder.",
                file=index,
                field=f"weight_map.{name}",
                fix="re-save the checkpoint with save_pretrained; qwen3-compile reads no files outside the "
                "checkpoint folder.",
            )
    return weight_map


def _is_shard_name(shard: object) -> bool:
    """A plain '*.safetensors' file name: no folder part, not hidden, no NUL (which os calls refuse)."""
    return (
        isinstance(shard, str)
        and shard == Path(shard).name
        and shard.endswith(".safetensors")
        and not shard.startswith(".")
        and "\x00" not in shard
    )


def _weight_files(directory: Path, weight_map: dict[str, str] | None) -> tuple[Path, ...]:
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise BadInputError(
                f"{len(missing)} shard(s) listed in the index are missing: {', '.join(missing[:3])}.",
                file=directory / INDEX_FILE,
                field="weight_map",
                fix="copy the missing shard files into the checkpoint directory.",
            )
        return tuple(directory / s for s in shards)
    if (directory / SINGLE_FILE).exists():
        return (directory / SINGLE_FILE,)
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return tuple(found)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise BadInputError(
            f"only pickle weights found ({', '.join(pickles[:3])}); qwen3-compile loads safetensors only.",
            file=directory / pickles[0],
            fix=CONVERT_HINT,
        )
    raise BadInputError(
        "no weights found (no model.safetensors, no shard index).",
        file=directory,
        fix="point at a directory written by save_pretrained.",
    )


def _read_all_headers(
    directory: Path, files: tuple[Path, ...], weight_map: dict[str, str] | None
) -> dict[str, TensorEntry]:
    tensors: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path).items():
            if name in tensors:
                raise BadInputError(
                    f"tensor '{name}' appears in two shards ({tensors[name].file.name} and {path.name}).",
                    file=path,
                    fix="re-save the checkpoint.",
                )
            tensors[name] = entry
    for name, shard in (weight_map or {}).items():
        entry = tensors.get(name)
        if entry is None or entry.file.name != shard:
            raise BadInputError(
                f"the index places tensor '{name}' in {shard}, but it is not there.",
                file=directory / INDEX_FILE,
                field=f"weight_map.{name}",
                fix="re-save the checkpoint; the index and the shards disagree.",
            )
    return {n: t for n, t in tensors.items() if not n.endswith(IGNORED_SUFFIXES)}


def _check_tensors(
    arch: Qwen3Arch, tensors: dict[str, TensorEntry], layout: ExpertLayout, config_path: Path
) -> ImportedQuantization | None:
    """Every tensor the architecture needs, with its shape and dtype; for a quantized checkpoint, the
    quantized linears' stored tensors in place of their float weights (models/quantized/)."""
    expected = expected_shapes(arch, layout, include_lm_head=False)
    if not arch.tie_word_embeddings:
        expected["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    elif "lm_head.weight" in tensors:
        expected["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    quantization = _quantization(expected, tensors, config_path)
    if quantization is not None:
        consumed = quantization.consumed
        tensors = {n: e for n, e in tensors.items() if n not in consumed}
        expected = {n: s for n, s in expected.items() if n not in quantization.linears}
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise BadInputError(
            f"{len(missing)} tensor(s) the config requires are missing, e.g. '{missing[0]}'.",
            file=config_path.parent,
            field=missing[0],
            fix="check that config.json belongs to these weights (num_hidden_layers, num_experts, "
            "tie_word_embeddings) and that no shard is missing.",
        )
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        entry = tensors[unexpected[0]]
        raise BadInputError(
            f"{len(unexpected)} tensor(s) are not part of a Qwen3 model as configured, e.g. "
            f"'{unexpected[0]}'.",
            file=entry.file,
            field=unexpected[0],
            fix="check that config.json belongs to these weights (a quantized or adapter checkpoint is "
            "not a plain Qwen3 checkpoint).",
        )
    for name, shape in expected.items():
        entry = tensors[name]
        if entry.shape != shape:
            raise BadInputError(
                f"tensor '{name}' has shape {list(entry.shape)}, the config implies {list(shape)}.",
                file=entry.file,
                field=name,
                fix="check hidden_size, head_dim, num_attention_heads, num_key_value_heads and the "
                "intermediate sizes in config.json against these weights.",
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise BadInputError(
                f"tensor '{name}' is {entry.dtype}; qwen3-compile reads {', '.join(FLOAT_DTYPES)} weights.",
                file=entry.file,
                field=name,
                fix="use the bf16 release of the model; quantize it with a qwen3-compile recipe.",
            )
    return quantization


def _quantization(
    expected: dict, tensors: dict[str, TensorEntry], config_path: Path
) -> ImportedQuantization | None:
    fix = "repair the file or re-save the config with save_pretrained."
    fmt = parse_quantization_config(read_json_object(config_path, MAX_CONFIG_BYTES, fix, fix), config_path)
    if fmt is None:
        return None
    fused = any(n.endswith("experts.gate_up_proj") for n in expected)
    return plan_import(fmt, expected, tensors, fused, config_path)


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Validate a checkpoint directory without reading tensor data."""
    directory = Path(directory)
    if not directory.exists():
        raise BadInputError(
            "the path does not exist.",
            file=directory,
            fix="pass a preset name or an existing checkpoint directory.",
        )
    if not directory.is_dir():
        raise BadInputError(
            "expected a checkpoint directory, got a file.",
            file=directory,
            fix="pass the directory that holds config.json.",
        )
    try:
        list(directory.iterdir())
    except PermissionError:
        raise BadInputError(
            "the directory is not readable.", file=directory, fix="check its permissions."
        ) from None
    check_folder(directory)
    arch = Qwen3Arch.from_config_file(directory / "config.json")
    index = directory / INDEX_FILE
    weight_map = _shard_index(index) if index.exists() or index.is_symlink() else None
    files = _weight_files(directory, weight_map)
    tensors = _read_all_headers(directory, files, weight_map)
    layout = detect_expert_layout(set(tensors)) if arch.is_moe else ExpertLayout.FUSED
    quantization = _check_tensors(arch, tensors, layout, directory / "config.json")
    return Checkpoint(directory, arch, tensors, layout, files, quantization)


def iter_tensors(
    ckpt: Checkpoint, progress: Progress = NO_PROGRESS, stage: str = "read weights"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every float weight, file by file, memory-mapped: nothing is kept around. A
    quantized checkpoint's quantized linears are not among them (`dequantized_tensors`)."""
    from safetensors import SafetensorError, safe_open

    skip = ckpt.quantization.consumed if ckpt.quantization is not None else set()
    by_file: dict[Path, list[str]] = {}
    for name, entry in ckpt.tensors.items():
        if name not in skip:  # quantized linears: read and checked by models/quantized
            by_file.setdefault(entry.file, []).append(name)
    total = sum(len(names) for names in by_file.values())
    with progress.stage(stage, total=total, unit="tensors") as advance:
        for path, names in by_file.items():
            # safe_open takes a path, not a descriptor: a file swapped for a pipe since open_checkpoint
            # would block it, so look again right before
            try:
                check_regular(path)
                with safe_open(str(path), framework="pt") as f:
                    for name in names:
                        yield name, f.get_tensor(name)
                        advance(1)
            except (SafetensorError, OSError) as err:
                raise BadInputError(
                    f"cannot read the weights ({err}).", file=path, fix="re-download or re-save the file."
                ) from None


def refuse_nonfinite(ckpt: Checkpoint, nonfinite: list[str]) -> None:
    if nonfinite:
        raise BadInputError(
            f"{len(nonfinite)} tensor(s) contain NaN or Inf values: {', '.join(nonfinite[:5])}.",
            file=ckpt.tensors[nonfinite[0]].file,
            field=nonfinite[0],
            fix="the checkpoint is damaged (re-download it); pass --allow-nonfinite to use it anyway.",
        )


# exponent bits of each float format: all ones means Inf or NaN
_EXPONENT = {"bfloat16": ("uint16", 0x7F80), "float16": ("uint16", 0x7C00), "float32": ("uint32", 0x7F800000)}
_NONFINITE_CHUNK = 1 << 24  # values tested at a time: bounds the temporaries of a large tensor


def has_nonfinite(tensor: torch.Tensor) -> bool:
    """NaN or Inf anywhere, from the exponent bits (torch.isfinite on bf16 runs at ~50M values/s on
    CPU, 20x slower than this; it made the finite check the export's bottleneck). Other dtypes go
    through torch.isfinite."""
    import numpy as np
    import torch

    spec = _EXPONENT.get(str(tensor.dtype).removeprefix("torch."))
    if spec is None:
        return not bool(torch.isfinite(tensor).all())
    uint, mask = spec
    t = tensor.detach().contiguous().cpu()
    signed = torch.int16 if t.element_size() == 2 else torch.int32
    bits = t.view(signed).numpy().reshape(-1).view(uint)
    mask = np.asarray(mask, dtype=uint)
    return any(
        bool(((bits[i : i + _NONFINITE_CHUNK] & mask) == mask).any())
        for i in range(0, bits.size, _NONFINITE_CHUNK)
    )


def scan_nonfinite(ckpt: Checkpoint, progress: Progress = NO_PROGRESS) -> list[str]:
    """Names of tensors holding NaN or Inf, reading every weight once (a quantized linear's stored values
    and scales are checked as they are dequantized: a bad scale is refused by name)."""
    names = [n for n, t in iter_tensors(ckpt, progress, "check weights") if has_nonfinite(t)]
    return names + [n for n, t in dequantized_tensors(ckpt, progress) if has_nonfinite(t)]


def load_state_dict(
    ckpt: Checkpoint,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
    progress: Progress = NO_PROGRESS,
) -> dict[str, torch.Tensor]:
    """All weights, experts fused as [E, 2I, H] / [E, H, I], checked for NaN/Inf."""
    state: dict[str, torch.Tensor] = {}
    nonfinite: list[str] = []
    for name, t in iter_tensors(ckpt, progress, "load weights"):
        if not allow_nonfinite and has_nonfinite(t):
            nonfinite.append(name)
        state[name] = t.to(dtype) if dtype is not None else t
    if not allow_nonfinite:
        refuse_nonfinite(ckpt, nonfinite)
    for name, t in dequantized_tensors(ckpt, progress):
        state[name] = t.to(dtype) if dtype is not None else t
    if ckpt.arch.is_moe and ckpt.expert_layout is ExpertLayout.PER_EXPERT:
        _fuse_experts(ckpt.arch, state)
    return state


def dequantized_tensors(
    ckpt: Checkpoint, progress: Progress = NO_PROGRESS
) -> Iterator[tuple[str, torch.Tensor]]:
    """(float weight name, exact fp32 dequantization) for each quantized linear of an imported checkpoint;
    values are checked as they are read (models/quantized)."""
    import torch

    quant = ckpt.quantization
    if quant is None:
        return
    with progress.stage("dequantize weights", total=len(quant.linears), unit="tensors") as advance:
        for name in quant.linears:
            yield name, torch.from_numpy(quant.read(name).dequantize())
            advance(1)


def _fuse_experts(arch: Qwen3Arch, state: dict) -> None:
    """Per-expert gate/up/down matrices -> transformers 5's stacked gate_up [E, 2I, H], down [E, H, I]."""
    import torch

    for layer in range(arch.num_layers):
        gate_up, down = [], []
        for e in range(arch.num_experts):
            g, u, d = (state.pop(n) for n in per_expert_names(layer, e))
            gate_up.append(torch.cat([g, u], dim=0))
            down.append(d)
        gate_up_name, down_name = fused_expert_names(layer)
        state[gate_up_name] = torch.stack(gate_up)
        state[down_name] = torch.stack(down)
