"""What each artifact folder's `manifest.json` holds, one frozen dataclass per artifact kind.

Written and read through the strict decoder (`qwen3_compile.schema`) that recipes and targets use: an
unknown key, a wrong type or a non-finite number is an exit-2 error naming the file and the field. Free-form
records (the Hugging Face config, calibration summaries, rewrite reports) stay JSON mappings, typed as
such. `read_manifest(folder)` picks the class from the `stage` field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from qwen3_compile.targets import Target

SCHEMA_VERSION = 1
Json = dict[str, Any]
OrtLevel = Literal["disabled", "basic", "all"]


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    sha256: str
    bytes: int = field(metadata={"min": 0})


@dataclass(frozen=True, kw_only=True)
class GraphOptions:
    """How the graph was exported; every stage after export carries them forward."""

    dtype: Literal["fp32", "fp16", "bf16"]
    opset: int = field(metadata={"min": 1})
    max_positions: int = field(metadata={"min": 1})


@dataclass(frozen=True, kw_only=True)
class SourceRecord:
    """The artifact a derived one was made from, and the hashes it had when it was read."""

    artifact: str
    stage: Literal["export", "quantize"]
    model_sha256: str
    manifest_sha256: str | None = None
    source: Json | None = None  # the source's own inputs (the model it came from)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Fields every manifest has; `outputs` lists every file of the folder with its hash."""

    stage: str
    schema_version: int = field(default=SCHEMA_VERSION, metadata={"min": 1, "max": SCHEMA_VERSION})
    tools: dict[str, str]
    outputs: dict[str, FileRecord]
    timings_s: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class ExportManifest(Manifest):
    stage: Literal["export"] = "export"
    inputs: Json  # a preset (name, seed, layers) or a checkpoint (folder, file hashes)
    options: GraphOptions
    architecture: Json  # the Hugging Face config the graph implements
    op_histogram: dict[str, int]
    resumed_after_groups: int = field(default=0, metadata={"min": 0})
    # a published quantized checkpoint exported with its own values (models/quantized): the format, which
    # modules, bytes; and how ONNX Runtime must run its DequantizeLinear graph
    imported: Json | None = None
    ort_optimization: OrtLevel = "all"
    ort_session_config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions(GraphOptions):
    target: str | None = None  # the deployment device the recipe was checked against


@dataclass(frozen=True, kw_only=True)
class QuantizationTotals:
    quantized_tensors: int = field(metadata={"min": 0})
    float_bytes: int = field(metadata={"min": 0})
    quantized_bytes: int = field(metadata={"min": 0})


@dataclass(frozen=True, kw_only=True)
class QuantizedTensor:
    """One weight the recipe quantized."""

    name: str  # checkpoint name
    shape: tuple[int, ...]
    float_bytes: int = field(metadata={"min": 0})
    quantized_bytes: int = field(metadata={"min": 0})  # 8-bit (or packed 4-bit) values + scales


@dataclass(frozen=True, kw_only=True)
class QuantizeManifest(Manifest):
    stage: Literal["quantize"] = "quantize"
    inputs: SourceRecord
    options: QuantizeOptions
    architecture: Json
    recipe: Json  # QuantRecipe.to_dict(); decoded by QuantRecipe.from_dict where a stage needs it
    quantization: QuantizationTotals
    # each weight behind `quantization`'s totals; empty in folders written before it was recorded
    tensors: tuple[QuantizedTensor, ...] = ()
    calibration: Json | None = None
    smoothquant: Json | None = None
    awq: Json | None = None  # per scaled group: the alpha chosen, the loss against round-to-nearest
    warnings: tuple[str, ...] = ()
    # how ONNX Runtime must run the graph (backends/onnxruntime/settings.py says why)
    ort_optimization: OrtLevel = "all"
    ort_session_config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class MoeRecord:
    lowering: str  # trt_moe, plugin, dense; "none" for dense models
    skipped: dict[str, str] = field(default_factory=dict)  # preferred lowerings not used, and why
    plugin: str | None = None


@dataclass(frozen=True, kw_only=True)
class LoweringRecord:
    runtime: Literal["ort", "tensorrt"]
    target: str | None = None
    moe: MoeRecord | None = None
    applied: dict[str, int] = field(default_factory=dict)  # rule -> rewrites
    declined: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rule -> why nodes stayed


@dataclass(frozen=True, kw_only=True)
class LowerOptions(GraphOptions):
    runtime: Literal["ort", "tensorrt"]
    target: str | None = None
    moe_lowering: str | None = None
    # ONNX Runtime: attention as exported (standard ops) or one GroupQueryAttention per layer
    attention: Literal["standard", "gqa"] = "standard"
    # logits of every position (what validate compares) or of the last only (a deployment graph)
    logits: Literal["all", "last"] = "all"


@dataclass(frozen=True, kw_only=True)
class LowerManifest(Manifest):
    stage: Literal["lower"] = "lower"
    inputs: SourceRecord
    options: LowerOptions
    architecture: Json
    op_histogram: dict[str, int]
    lowering: LoweringRecord
    # carried from a quantized source: how to judge and run the same weights
    recipe: Json | None = None
    quantization: QuantizationTotals | None = None
    calibration: Json | None = None
    ort_optimization: OrtLevel = "all"
    ort_session_config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EngineOptions(GraphOptions):
    target: str
    max_batch: int = field(metadata={"min": 1})
    max_seq: int = field(metadata={"min": 2})
    moe_lowering: str | None = None
    plugins: tuple[str, ...] = ()
    logits: Literal["all", "last"] = "all"
    optimization_level: int | None = field(default=None, metadata={"min": 0, "max": 5})


@dataclass(frozen=True, kw_only=True)
class TensorRTRecord:
    flavour: Literal["tensorrt", "tensorrt-rtx"]
    module: str
    version: str


@dataclass(frozen=True, kw_only=True)
class TargetRecord:
    name: str
    sm: str
    description: str


@dataclass(frozen=True, kw_only=True)
class PlanRecord:
    file: str
    bytes: int = field(metadata={"min": 0})
    build_s: float = field(metadata={"min": 0})


@dataclass(frozen=True, kw_only=True)
class MemoryRecord:
    """Bytes the engine needs at its largest profile, and what the target leaves usable."""

    weights: int = field(metadata={"min": 0})
    kv_cache: int = field(metadata={"min": 0})
    activations: int = field(metadata={"min": 0})
    usable: int = field(metadata={"min": 0})
    total: int = field(metadata={"min": 0})
    fits: bool


@dataclass(frozen=True, kw_only=True)
class EngineManifest(Manifest):
    stage: Literal["build"] = "build"
    inputs: SourceRecord
    options: EngineOptions
    architecture: Json
    recipe: Json | None = None
    tensorrt: TensorRTRecord
    target: TargetRecord
    profiles: tuple[Json, ...]
    moe: MoeRecord
    attention: str
    lowering: Json
    op_histogram: dict[str, int]
    plugins: dict[str, str] = field(default_factory=dict)  # library path -> sha256
    memory: MemoryRecord
    timing_cache: str | None = None
    engine: PlanRecord


ARTIFACT_KINDS: dict[str, type[Manifest]] = {
    "export": ExportManifest,
    "quantize": QuantizeManifest,
    "lower": LowerManifest,
    "build": EngineManifest,
}
AnyManifest = ExportManifest | QuantizeManifest | LowerManifest | EngineManifest


@dataclass(frozen=True, kw_only=True)
class BundledArtifact:
    folder: str
    model: str
    stage: Literal["export", "quantize"]
    label: str
    dtype: Literal["fp32", "fp16", "bf16"]
    model_sha256: str


@dataclass(frozen=True, kw_only=True)
class BundleMemory(MemoryRecord):
    precision: str
    context: int = field(metadata={"min": 1})
    batch: int = field(metadata={"min": 1})
    weights_stored: int = field(metadata={"min": 0})
    weights_architecture: int = field(metadata={"min": 0})


@dataclass(frozen=True, kw_only=True)
class BundleMoe:
    lowering: str
    skipped: dict[str, str] = field(default_factory=dict)
    plugin_library: str | None = None


@dataclass(frozen=True, kw_only=True)
class BundleManifest:
    """A Jetson bundle's manifest.json. The device scripts inside the bundle read the same file with their
    own small reader (they cannot import this package)."""

    format: int = field(metadata={"min": 1, "max": 1})
    stage: Literal["bundle"] = "bundle"
    artifact: BundledArtifact
    architecture: Json
    recipe: Json | None = None
    target: Target  # recipes/targets/*.toml's fields
    tools: dict[str, str]
    memory: BundleMemory
    moe: BundleMoe
    lowering: Json
    op_histogram: dict[str, int]
    logits: Literal["last"]
    profiles: tuple[Json, ...]
    ort_optimization: OrtLevel = "all"
    ort_session_config: dict[str, str] = field(default_factory=dict)
    validation: Json
    smoke_reference: Json | None = None
    warnings: tuple[str, ...] = ()
    trtexec: str
    files: dict[str, FileRecord]


@dataclass(frozen=True, kw_only=True)
class ValidationRecord:
    """A validation folder's report.json: the verdict, the gates it was held to, and what was measured."""

    artifact: str
    model_sha256: str | None = None  # of the validated graph: a report beside another model is refused
    reference: str
    reference_device: str = "cpu"  # where the PyTorch reference ran
    backend: str
    backend_settings: Json  # how the backend ran the artifact (ORT's session options)
    passed: bool
    failures: tuple[str, ...]
    gates: dict[str, float | None]
    gates_source: str
    modes: tuple[str, ...]
    summary: Json
    bisection: Json | None = None
    perplexity: Json | None = None  # reference and artifact perplexity on a text (validate --ppl)
    recipe_check: Json | None = None  # quantized artifacts: against the recipe's fake-quantized model
    cases: tuple[Json, ...]
    environment: Json | None = None  # Python, processor and package versions it was computed with
