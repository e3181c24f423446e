"""How ONNX Runtime must run an artifact, as its manifest records it: every ORT session the toolchain opens
on an artifact (validation, bisection, generation, the bundled runner) takes its options from here.

- `ort_optimization`: FP8 QDQ graphs ask for ENABLE_BASIC; ORT CPU computes FP8 QDQ MatMuls wrongly at
  the higher levels (DESIGN.md section 3).
- `ort_session_config`: session config entries, chosen by `quantize --ort-qdq`:
  - `reference` (the default): `session.disable_quant_qdq=1`, ORT runs the QDQ graph as written. Weights are
    dequantized once at load and held in float, so the numbers are the recipe's own. Without it, at
    ENABLE_ALL ORT fuses each INT8 DequantizeLinear -> MatMul into MatMulNBits at accuracy level 4, which
    quantizes the activations to int8 as well: a weight-only recipe ran as W8A8 (tiny-moe int8-wo: mean KL
    0.0109 against 0.0056).
  - `fused`: ORT's QDQ fusions with MatMulNBits at accuracy level 4, stated explicitly: INT8 weights stay
    int8 in memory, weight-only MatMuls quantize their activations per block.
  Measured side by side on ORT CPU (README, Quantization): `reference` costs float weights in memory, not
  speed (int8-sq decodes 2x faster than fused; int8-wo within noise).
- `execution_providers`: where the session runs (`cpu`, or `cuda` for the `ort-cuda` backend). On CUDA,
  TF32 is OFF (`use_tf32=0`; ORT's default is on): fp32 graphs are validated against the fp32 reference at
  1e-3, and TF32's 10-bit mantissa in the router projection of a 128-expert model flips near-tied top-k
  choices (docs/benchmarks.md, ONNX Runtime on CUDA).
"""

from __future__ import annotations

import os
from typing import Any

from onnx import TensorProto

from qwen3_compile.errors import BadInputError

LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_ALL"}
# What the quantize stage records per --ort-qdq; an artifact without a record runs at ORT's defaults.
ORT_QDQ = {
    "reference": {"session.disable_quant_qdq": "1"},
    "fused": {"session.qdq_matmulnbits_accuracy_level": "4"},
}


def installed_version() -> str:
    """The installed ONNX Runtime's version (lowering rules whose exactness depends on it ask here)."""
    import onnxruntime as ort

    return ort.__version__


def contrib_op_inputs(op_type: str) -> set[str]:
    """The input names the installed ONNX Runtime declares for its com.microsoft `op_type` (empty when it
    has no such op or does not expose its schemas): lowering rules whose form depends on it ask here."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        schemas = ort_c.get_all_operator_schema()
    except (ImportError, AttributeError):
        return set()
    found = [s for s in schemas if s.name == op_type and s.domain == "com.microsoft"]
    newest = max(found, key=lambda s: s.since_version, default=None)
    return {i.name for i in newest.inputs} if newest is not None else set()


def ort_optimization(manifest) -> str:
    """What the artifact records (quantize and lower manifests); an export runs at ORT's default."""
    return getattr(manifest, "ort_optimization", "all")


def ort_session_config(manifest) -> dict[str, str]:
    return dict(getattr(manifest, "ort_session_config", {}))


# CPU threads of every ORT session when the caller names none (default: ORT's, one per physical core).
# Where several processes share the cores (parallel test workers, a build farm) each should take fewer.
THREADS_ENV = "QWEN3_COMPILE_ORT_THREADS"


def default_threads() -> int | None:
    value = os.environ.get(THREADS_ENV, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BadInputError(
            f"${THREADS_ENV} is {value!r}, not a positive whole number.",
            field=THREADS_ENV,
            fix="set it to the number of CPU threads an ONNX Runtime session may use (e.g. 1), or unset it.",
        )
    return int(value)


def session_options(
    optimization: str = "all", config: dict[str, str] | None = None, threads: int | None = None
):
    import onnxruntime as ort

    threads = threads or default_threads()

    if optimization not in LEVELS:
        raise ValueError(f"ORT optimization level {optimization!r} is not one of {list(LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[optimization])
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    return options


DEVICES = ("cpu", "cuda")
CUDA_PROVIDER = "CUDAExecutionProvider"
# ORT's CUDA provider options as strings (what `get_provider_options` reports back); TF32 off: see above
CUDA_OPTIONS = {"device_id": "0", "use_tf32": "0"}
GPU_PACKAGE_FIX = (
    "install the CUDA build of ONNX Runtime in place of the CPU one: `pip uninstall -y onnxruntime && "
    "pip install 'qwen3-compile[gpu]'` (onnxruntime-gpu; its CUDA major must match the driver's CUDA, and "
    "it needs cuBLAS/cuDNN, e.g. from torch's CUDA wheels or nvidia-*-cu13), or use --backend ort (CPU)."
)


def execution_providers(device: str = "cpu", cuda_options: dict[str, str] | None = None) -> list:
    """The `providers` argument of an InferenceSession on `device`; CUDA keeps the CPU provider as the
    fallback for the few nodes it has no kernel for (ORT places them; the session reports them)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return [(CUDA_PROVIDER, CUDA_OPTIONS | (cuda_options or {})), "CPUExecutionProvider"]
    raise ValueError(f"ORT device {device!r} is not one of {list(DEVICES)}")


def require_cuda_provider(purpose: str = "the ort-cuda backend") -> None:
    """Fail with the fix (exit code 2) where this ONNX Runtime cannot run on CUDA: the CPU-only package,
    or the CUDA build whose provider cannot load its CUDA libraries."""
    from qwen3_compile.errors import BadInputError

    try:
        import onnxruntime as ort
    except ImportError:
        raise BadInputError(
            f"ONNX Runtime is not installed ({purpose} needs onnxruntime-gpu).",
            field="backend",
            fix=GPU_PACKAGE_FIX,
        ) from None
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None and CUDA_PROVIDER in ort.get_available_providers():
        try:  # CUDA/cuDNN from the nvidia-* wheels (torch's) when they are not on the loader path
            preload()
        except Exception:
            pass
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise BadInputError(
            f"this ONNX Runtime ({ort.__version__}, providers: {', '.join(available)}) has no "
            f"{CUDA_PROVIDER}, which {purpose} needs.",
            field="--backend",
            fix=GPU_PACKAGE_FIX,
        )


def check_session_device(session, device: str, model_path) -> None:
    """ORT silently falls back to the CPU when the CUDA provider fails to load (no driver, missing
    libcublas/libcudnn): a session asked for CUDA that did not get it is an error, not a slow run."""
    from qwen3_compile.errors import BadInputError

    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise BadInputError(
            f"ONNX Runtime created the session without {CUDA_PROVIDER} (it fell back to "
            f"{', '.join(session.get_providers())}): the CUDA provider could not load (no GPU or driver, or "
            "missing CUDA libraries; ORT's log above names the library).",
            file=model_path,
            field="--backend",
            fix="run on a machine with an NVIDIA GPU and driver, make libcublas/libcudnn of the CUDA version "
            "onnxruntime-gpu was built for loadable (onnxruntime.preload_dlls() finds the nvidia-* wheels), "
            "or use --backend ort (CPU).",
        )


def manifest_session_options(manifest: dict[str, Any], threads: int | None = None):
    return session_options(ort_optimization(manifest), ort_session_config(manifest), threads)


# ORT's load-time errors that mean the graph file is not one this ONNX Runtime can run (its exception class
# name -> what to tell the user); any other failure (CUDA out of memory, a driver error) is not the input's
_GRAPH_ERRORS = {
    "InvalidProtobuf": "is not a readable ONNX model",
    "InvalidGraph": "is not a valid ONNX graph",
    "NoSuchFile": "or a file it references (external data) is missing",
    "NotImplemented": "uses an operator this ONNX Runtime provider has no kernel for",
}


# ORT type string -> ONNX element type: OrtValues of types numpy lacks (bf16) are made from these
ONNX_TYPES = {
    "tensor(float)": TensorProto.FLOAT,
    "tensor(float16)": TensorProto.FLOAT16,
    "tensor(bfloat16)": TensorProto.BFLOAT16,
}


def empty_past(batch: int, kv_heads: int, head_dim: int, ort_type: str):
    """A zero-length past key or value as an OrtValue (host memory: nothing to copy; ORT moves it)."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_shape_and_type(
        [batch, kv_heads, 0, head_dim], ONNX_TYPES[ort_type], "cpu", 0
    )


def open_session(
    model,
    options,
    model_path,
    device: str = "cpu",
    providers: list | None = None,
    cuda_options: dict[str, str] | None = None,
    libraries: tuple = (),
):
    """Every ORT session the toolchain opens on an artifact: `model` (a path or serialized graph) on
    `device`, with the custom-op `libraries` registered (op_libraries.py). Failures users can act on exit 2
    naming `model_path`: a library refusing the model, a damaged or foreign graph, a missing external-data
    file, an IR version or operator this ONNX Runtime does not support, a CUDA session that fell back to
    the CPU."""
    import onnxruntime as ort

    from qwen3_compile.backends.onnxruntime.op_libraries import register_custom_ops, session_error
    from qwen3_compile.errors import BadInputError

    register_custom_ops(options, libraries)
    try:
        session = ort.InferenceSession(
            model, options, providers=providers or execution_providers(device, cuda_options)
        )
    except Exception as err:
        kind, message = type(err).__name__, str(err)
        library_error = session_error(err, libraries, model_path)
        if library_error is not err:
            raise library_error from err
        unsupported = kind == "Fail" and ("IR version" in message or "opset" in message.lower())
        if kind not in _GRAPH_ERRORS and not unsupported:
            raise
        what = _GRAPH_ERRORS.get(kind, "needs a newer ONNX Runtime (IR version or opset)")
        raise BadInputError(
            f"ONNX Runtime {ort.__version__} cannot load it: the graph {what} ({message.strip()[:300]}).",
            file=model_path,
            field="model.onnx",
            fix="re-run the stage that wrote this folder (a damaged file, or one made by other tools), or "
            "upgrade onnxruntime to run a graph made for a newer one.",
        ) from None
    check_session_device(session, device, model_path)
    return session
