"""The ONNX Runtime custom-op library `libqmoe_ort.so` (plugins/moe/ort): the canonical graph's
`qwen3_compile::ExpertDispatch` on ORT's CUDA provider with the qmoe kernels, no graph rewrite; and
`qwen3_compile::WeightOnlyExpertDispatch`, which `lower --for ort --moe-lowering custom-op` writes for INT8 /
INT4 weight-only experts (the quantized initializers and scales as inputs).

- default suite (CPU): `--ort-ops` / $QWEN3_COMPILE_ORT_OPS errors (missing or unloadable file, wrong
  backend); CPU sessions never register the library.
- slow (CPU, nvcc + cmake + ORT's C API header): the CMake target builds for sm_90, exports only
  RegisterCustomOps (+ the qmoe C ABI), links no libonnxruntime, registers in this ORT, and then claims the
  node: a CPU-only session has no implementation for it (ORT does not fall back to the function body).
- gpu (the device, onnxruntime-gpu): one-node models against the float64 reference (fp16/bf16, fp32/bf16
  router logits, token counts that take the GEMV, single-token, mma.sync and wgmma kernels, N=0), a refused
  shape and activation, and a qmoe-sized MoE export (hidden 128, 8 experts x 64, top-2) with the library
  against the same graph without it (ORT inlines the function body) and against PyTorch on fresh random
  prompts; ORT's profile shows the node ran as one ExpertDispatch kernel on the CUDA provider.
  Weight-only experts: one-node WeightOnlyExpertDispatch models (int8 with fp16/fp32 scales, int4 with groups
  of 32 and 128, fp16/bf16 activations, the 30B-A3B shapes) against the float64 reference of the dequantized
  weights; a group size and block-size attributes the kernels refuse; and the qmoe-sized MoE quantized with
  int8-wo and int4-rtn (group 32) from its fp16 export, lowered for the library, with the library against the
  same lowered artifact without it (ORT runs the node's function body: DequantizeLinear + the dense experts).
  tiny-moe's INT8/INT4 artifacts cannot take this path: its 64-wide layers are below the kernels' minimum, so
  the lowering keeps their DequantizeLinear -> ExpertDispatch (tests/lower/test_ort_custom_op_moe.py).

ORT's C API header is not part of this project: set ORT_INCLUDE_DIR to a folder with onnxruntime_c_api.h (and
onnxruntime_ep_c_api.h, onnxruntime_error_code.h, which it includes), or put them in the ignored
third_party_headers/onnxruntime/ (plugins/README.md). On the device:

    PYTHONPATH=.:/root/ortsite python3 -m pytest -m gpu tests/backends/test_ort_custom_op.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qwen3_compile.backends.onnxruntime.op_libraries import ORT_OPS_ENV, selected_custom_ops
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.cli import main
from qwen3_compile.custom_ops import DOMAIN, EXPERT_DISPATCH, WEIGHT_ONLY_EXPERT_DISPATCH, function
from qwen3_compile.errors import BadInputError
from qwen3_compile.kernels import build

REPO = Path(__file__).resolve().parents[2]
MAP = REPO / "plugins" / "moe" / "ort" / "qmoe_ort.map"
HEADER = "onnxruntime_c_api.h"


def ort_include_dir() -> Path | None:
    for candidate in (os.environ.get("ORT_INCLUDE_DIR"), REPO / "third_party_headers" / "onnxruntime"):
        if candidate and (Path(candidate) / HEADER).is_file():
            return Path(candidate).resolve()
    return None


NO_HEADER = (
    f"ORT's C API header ({HEADER}) not found: set ORT_INCLUDE_DIR or fill third_party_headers/onnxruntime "
    "(plugins/README.md, ONNX Runtime custom op)"
)
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


def build_with_cmake(build_dir: Path, archs: str = "90") -> Path:
    """The documented build: `cmake -S plugins/moe -B DIR -DQMOE_ARCHS=90 -DORT_INCLUDE_DIR=...`."""
    configure = [
        "cmake",
        "-S",
        str(REPO / "plugins" / "moe"),
        "-B",
        str(build_dir),
        f"-DQMOE_ARCHS={archs}",
        f"-DORT_INCLUDE_DIR={ort_include_dir()}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    nvcc = build.find_nvcc()
    if nvcc:
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    for cmd in (configure, ["cmake", "--build", str(build_dir), "--target", "qmoe_ort", "-j", "8"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lib = build_dir / "libqmoe_ort.so"
    assert lib.is_file(), f"no {lib} after the build"
    return lib


def build_library(tmp: Path) -> Path:
    """cmake where it is installed, else the same sources through nvcc directly (for a machine without
    cmake)."""
    if shutil.which("cmake"):
        return build_with_cmake(tmp / "cmake")
    inc = ort_include_dir()
    built = build.compile_library(
        "libqmoe_ort",
        ("-isystem", str(inc), "-Xlinker", f"-Bsymbolic,--version-script={MAP}"),
        ("90",),
        tmp,
        None,
        8,
        False,
        ("ort/qmoe_ort_op.cpp",),
        (inc / HEADER).read_bytes(),
    )
    return built.path


def expert_dispatch_model(
    act: int, logits: int, weights: tuple[np.ndarray, np.ndarray], top_k: int, activation: str = "silu"
) -> bytes:
    """One ExpertDispatch node with its model-local function; fp32 graph inputs and output cast to and from
    `act`/`logits` inside the graph (numpy has no bf16), the expert weights as `act` initializers."""
    gate_up, down = weights
    h = gate_up.shape[2]
    e = gate_up.shape[0]
    nodes = [
        helper.make_node("Cast", ["x32"], ["x"], to=act),
        helper.make_node("Cast", ["logits32"], ["logits"], to=logits),
        helper.make_node(
            EXPERT_DISPATCH,
            ["x", "logits", "gate_up", "down"],
            ["y"],
            domain=DOMAIN,
            name="moe",
            top_k=top_k,
            normalize=1,
            activation=activation,
        ),
        helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT),
    ]
    inits = [_initializer("gate_up", gate_up, act), _initializer("down", down, act)]
    graph = helper.make_graph(
        nodes,
        "expert_dispatch",
        [
            helper.make_tensor_value_info("x32", TensorProto.FLOAT, ["N", h]),
            helper.make_tensor_value_info("logits32", TensorProto.FLOAT, ["N", e]),
        ],
        [helper.make_tensor_value_info("y32", TensorProto.FLOAT, ["N", h])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function(EXPERT_DISPATCH, 21)])
    model.ir_version = 10
    return model.SerializeToString()


def _initializer(name: str, array: np.ndarray, dtype: int) -> onnx.TensorProto:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    t = t.to(torch.float16 if dtype == TensorProto.FLOAT16 else torch.bfloat16)
    raw = t.view(torch.int16).numpy().tobytes()
    return helper.make_tensor(name, dtype, list(array.shape), raw, raw=True)


def cuda_session(model, library: Path | None, profile: bool = False) -> ort.InferenceSession:
    from qwen3_compile.backends.onnxruntime.op_libraries import register_custom_ops
    from qwen3_compile.backends.onnxruntime.settings import execution_providers, session_options

    options = session_options("all")
    options.enable_profiling = profile
    register_custom_ops(options, (library,) if library else ())
    return ort.InferenceSession(model, options, providers=execution_providers("cuda"))


def profiled_ops(session: ort.InferenceSession) -> list[tuple[str, str]]:
    """(op, provider) of every node ORT ran, from its profile."""
    events = json.loads(Path(session.end_profiling()).read_text())
    return [(e["args"]["op_name"], e["args"]["provider"]) for e in events if e.get("cat") == "Node"]


# ---------------------------------------------------------------------------------------------------------
# default suite: the Python side, no library needed


def test_missing_library_is_a_clear_error(tmp_path):
    missing = tmp_path / "libqmoe_ort.so"
    args = ["validate", str(tmp_path), "--reference", "tiny-moe", "--backend", "ort-cuda"]
    result = CliRunner().invoke(main, [*args, "--ort-ops", str(missing), "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert error["file"] == str(missing) and "QWEN3_COMPILE_ORT_OPS" in error["field"]
    assert "does not exist" in error["error"] and "cmake" in error["fix"]
    assert ORT_OPS_ENV not in os.environ


def test_ort_ops_needs_the_ort_cuda_backend(tmp_path):
    lib = tmp_path / "libqmoe_ort.so"
    lib.write_bytes(b"")
    result = CliRunner().invoke(main, ["run", str(tmp_path), "-p", "hi", "--ort-ops", str(lib), "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert error["field"] == "--ort-ops" and "--backend ort-cuda" in error["fix"]


def test_unloadable_library_is_a_clear_error(artifacts, tmp_path):
    """ORT's dlopen failure becomes BadInputError naming the file, before any session (or GPU) is needed."""
    fake = tmp_path / "libqmoe_ort.so"
    fake.write_text("not a shared library")
    model = artifacts.export("tiny-moe", "fp16") / "model.onnx"
    with pytest.raises(BadInputError) as err:
        OrtRunner(model, device="cuda", custom_ops=[fake])
    assert err.value.file == str(fake) and "could not load" in err.value.problem
    assert err.value.exit_code == 2


def test_cpu_sessions_never_register_the_library(artifacts, monkeypatch):
    """$QWEN3_COMPILE_ORT_OPS is for CUDA sessions: on the CPU, once the library claimed the op, ORT would
    have no implementation for the node (the slow test shows it), so the CPU backend ignores it."""
    monkeypatch.setenv(ORT_OPS_ENV, "/nonexistent/libqmoe_ort.so")
    runner = OrtRunner(artifacts.export("tiny-moe", "fp16") / "model.onnx")
    assert runner.custom_ops == ()


def test_selected_custom_ops_restores_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ORT_OPS_ENV, "/earlier.so")
    lib = tmp_path / "libqmoe_ort.so"
    lib.write_bytes(b"")
    with selected_custom_ops(lib, "ort-cuda"):
        assert os.environ[ORT_OPS_ENV] == str(lib.resolve())
    assert os.environ[ORT_OPS_ENV] == "/earlier.so"


# ---------------------------------------------------------------------------------------------------------
# slow (CPU): the CMake build and what ORT does with the library on the CPU


@pytest.mark.slow
@pytest.mark.skipif(ort_include_dir() is None, reason=NO_HEADER)
@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (CUDA toolkit absent)")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_builds_a_library_that_claims_the_node(tmp_path):
    lib = build_with_cmake(tmp_path / "build")
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True)
    exported = {line.split()[-1] for line in symbols.stdout.splitlines() if line.strip()}
    assert "RegisterCustomOps" in exported
    assert all(n == "RegisterCustomOps" or n.startswith("qmoe_") for n in exported), exported
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "onnxruntime" not in needed, needed

    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((8, 128, 128)), rng.standard_normal((8, 128, 64)))
    model = expert_dispatch_model(TensorProto.FLOAT16, TensorProto.FLOAT, weights, top_k=2)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(lib))
    # registered for the CUDA provider only: ORT takes the library's op over the model-local function, so a
    # CPU-only session has no kernel for the node (and does not inline the function body)
    with pytest.raises(Exception, match="ExpertDispatch"):
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    ort.InferenceSession(model, ort.SessionOptions(), providers=["CPUExecutionProvider"])  # without: inlined

    # WeightOnlyExpertDispatch, int8 and int4 (declared as ORT's INT4 type): the graph resolves against the
    # library's schema (the inputs' types are accepted) and fails only for want of a CPU kernel
    import torch

    for kind, group in (("int8", 0), ("int4", 32)):
        quantized = _quantized_experts(rng, 8, 128, 64, kind, group, torch.float16)
        model = weight_only_model(TensorProto.FLOAT16, TensorProto.FLOAT, quantized, 2)
        with pytest.raises(Exception, match="Could not find an implementation for WeightOnlyExpertDispatch"):
            ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        ort.InferenceSession(model, ort.SessionOptions(), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------------
# gpu (the device): the kernels inside ORT

GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(
        not HAS_CUDA_EP, reason="needs onnxruntime-gpu (CUDAExecutionProvider); shared/DEVICE.md"
    ),
    pytest.mark.skipif(ort_include_dir() is None, reason=NO_HEADER),
    pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (CUDA toolkit absent)"),
)


def on_gpu(test):
    for mark in GPU_MARKS:
        test = mark(test)
    return test


def _profiled_prefill(model, library: Path, ids: list[int]):
    """A profiling CUDA session with the library that has run one prefill of `ids` from an empty cache."""
    profiled = cuda_session(str(model), library, profile=True)
    feeds = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None],
    }
    for past in profiled.get_inputs():
        if past.name.startswith("past_key_values."):
            dtype = np.float16 if past.type == "tensor(float16)" else np.float32
            feeds[past.name] = np.zeros((1, past.shape[1], 0, past.shape[3]), dtype=dtype)
    profiled.run(["logits"], feeds)
    return profiled


PREBUILT_ENV = "QWEN3_COMPILE_TEST_ORT_OPS"  # a libqmoe_ort.so from the documented CMake build, to reuse


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    prebuilt = os.environ.get(PREBUILT_ENV)
    if prebuilt:
        return Path(prebuilt)
    return build_library(tmp_path_factory.mktemp("qmoe-ort"))


def _reference(x, logits, weights, top_k, act):
    """float64 reference on the act-rounded inputs (qwen3_compile.kernels.moe), as numpy float64."""
    import torch

    from qwen3_compile.kernels.moe import moe_reference

    dt = torch.float16 if act == TensorProto.FLOAT16 else torch.bfloat16

    def rounded(a, dtype=dt):
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(dtype)

    gate_up, down = (rounded(w) for w in weights)
    # ties (common in 16-bit logits) go to the lower expert index, as the kernels define; torch's CPU topk
    # does not promise that, so the selection is a stable sort here
    probs = torch.softmax(logits.float(), dim=-1)
    ids = torch.from_numpy(np.argsort(-probs.numpy(), axis=-1, kind="stable")[:, :top_k].copy())
    w = torch.gather(probs, 1, ids)
    routing = (ids, w / w.sum(dim=-1, keepdim=True))
    return moe_reference(rounded(x), logits, gate_up, down, top_k, routing=routing).numpy()


ONE_NODE_CASES = [
    # (act, logits dtype, E, k, H, I, token counts): 1 token (single-token kernels), few (GEMV), many
    # (mma.sync), 2048 at 128 experts top-8 (wgmma on SM 9.0 with 16-bit weights), 0 (an empty output)
    ("fp16", "fp32", 16, 4, 256, 128, (0, 1, 7, 300)),
    ("bf16", "bf16", 16, 4, 256, 128, (1, 7, 300)),
    ("fp16", "fp16", 128, 8, 2048, 768, (1, 16, 512, 2048)),
    ("bf16", "fp32", 128, 8, 2048, 768, (1, 2048)),
]
_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


@on_gpu
@pytest.mark.parametrize(
    "case", ONE_NODE_CASES, ids=lambda c: f"{c[0]}-logits{c[1]}-E{c[2]}k{c[3]}H{c[4]}I{c[5]}"
)
def test_one_node_against_the_float64_reference(case, library):
    import torch

    act_name, logits_name, e, k, h, inter, counts = case
    act, logits_dtype = _DTYPES[act_name], _DTYPES[logits_name]
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 31))
    rng = np.random.default_rng(seed)
    weights = (
        rng.standard_normal((e, 2 * inter, h), dtype=np.float32) * np.float32(h**-0.5),
        rng.standard_normal((e, h, inter), dtype=np.float32) * np.float32(inter**-0.5),
    )
    model = expert_dispatch_model(act, logits_dtype, weights, k)
    session = cuda_session(model, library, profile=True)
    eps = float(torch.finfo(torch.float16 if act_name == "fp16" else torch.bfloat16).eps)
    for n in counts:
        x = rng.standard_normal((n, h)).astype(np.float32)
        logits = rng.standard_normal((n, e)).astype(np.float32)
        out = session.run(["y32"], {"x32": x, "logits32": logits})[0]
        assert out.shape == (n, h)
        if n == 0:
            continue
        routed = torch.from_numpy(logits).to(
            {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[logits_name]
        )
        ref = _reference(x, routed, weights, k, act)
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        print(f"seed {seed} {act_name} logits {logits_name} E{e} k{k} H{h} I{inter} N={n}: rel err {rel:.3e}")
        assert np.isfinite(out).all(), f"seed {seed}, N={n}: non-finite output"
        assert rel <= 2 * eps, f"seed {seed}, N={n}: norm-wise error {rel:.3e} > 2 eps ({eps:.2e})"
    ops = profiled_ops(session)
    assert ("ExpertDispatch", "CUDAExecutionProvider") in ops, ops
    assert not any(op in ("TopK", "ScatterElements", "Softmax") for op, _ in ops), ops


@on_gpu
@pytest.mark.parametrize(
    "shape, activation, message",
    [
        ((16, 4, 64, 32), "silu", "H % 128 == 0, I % 64 == 0"),  # tiny-moe's widths
        ((16, 4, 256, 128), "gelu", "activation 'gelu' is not supported"),
    ],
)
def test_refused_problems_fail_at_session_creation(shape, activation, message, library):
    e, k, h, inter = shape
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((e, 2 * inter, h)), rng.standard_normal((e, h, inter)))
    model = expert_dispatch_model(TensorProto.FLOAT16, TensorProto.FLOAT, weights, k, activation)
    with pytest.raises(Exception) as err:
        cuda_session(model, library)
    text = str(err.value)
    print(text)
    assert "qwen3_compile::ExpertDispatch (libqmoe_ort, node 'moe')" in text and message in text, text


@on_gpu
def test_tiny_moe_export_is_refused_through_the_runner(artifacts, library):
    """tiny-moe (hidden 64, experts 32 wide) is below the kernels' minimum: exit-code-2 error, not a crash."""
    with pytest.raises(BadInputError) as err:
        OrtRunner(artifacts.export("tiny-moe", "fp16") / "model.onnx", device="cuda", custom_ops=[library])
    print(err.value.message)
    assert "H % 128 == 0" in err.value.message and err.value.field.startswith("--ort-ops")


def _logit_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {
        "max_abs": float(np.abs(a - b).max()),
        "mean_abs": float(np.abs(a - b).mean()),
        "rel": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


@on_gpu
def test_moe_export_with_the_library_matches_the_function_body_and_pytorch(artifacts, library):
    """The qmoe-sized MoE export (fp16): the same graph with and without the library on ORT's CUDA provider,
    fresh random prompts (prefill + greedy decode through the GPU KV cache), then both against PyTorch (fp32
    reference, the fp16 export's parity gates as in test_ort_cuda.py). On ORT CPU the function body is within
    6e-4 (norm-wise) of PyTorch on this model, logits std 0.23."""
    from qwen3_compile.backends.base import generate, left_padded_batch
    from qwen3_compile.backends.torch_reference import TorchRunner
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.parity import ParityGates, check_parity
    from qwen3_compile.tokenizer import ENDOFTEXT_ID

    folder = artifacts.plugin_sized_moe("fp16")
    model = folder / "model.onnx"
    with_ops = OrtRunner(model, device="cuda", custom_ops=[library])
    body = OrtRunner(model, device="cpu", custom_ops=[])
    assert with_ops.custom_ops == (library,) and body.custom_ops == ()

    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 151643, size=int(n)).tolist() for n in (1, 5, 37, 200)]
    batch = left_padded_batch(prompts, ENDOFTEXT_ID)
    real = batch.attention_mask.astype(bool)
    a, b = generate(with_ops, batch, 8), generate(body, batch, 8)
    stats = _logit_stats(a.prefill_logits[real], b.prefill_logits[real])
    print(f"seed {seed}: library vs function body, prefill logits {stats}")
    assert stats["rel"] <= 1e-2 and stats["top1"] >= 0.98, f"seed {seed}: {stats}"

    reference = TorchRunner(load_model(str(artifacts.root / "moe-128-checkpoint")))
    expected = generate(reference, batch, 8)
    gates = ParityGates.for_dtype("fp16")
    modes = ["random"] * len(prompts)
    reports = {
        name: check_parity(expected, runner, prompts, modes, decode_steps=8, gates=gates)
        for name, runner in (("library", with_ops), ("function body", body))
    }
    for name, report in reports.items():
        print(f"seed {seed}: {name} vs PyTorch: {report.to_dict()}")
        assert report.passed and report.prefill_mean_abs <= 0.05, f"seed {seed}, {name}: {report.to_dict()}"
    # the kernels are at least about as close to PyTorch as ORT's own evaluation of the function body
    lib, fn = reports["library"], reports["function body"]
    assert lib.prefill_mean_abs <= 2 * fn.prefill_mean_abs + 1e-4, f"seed {seed}: {lib} vs {fn}"

    profiled = _profiled_prefill(model, library, prompts[2])
    ops = profiled_ops(profiled)
    graph = onnx.load(str(model), load_external_data=False).graph
    nodes = sum(n.op_type == EXPERT_DISPATCH and n.domain == DOMAIN for n in graph.node)
    ran = [provider for op, provider in ops if op == EXPERT_DISPATCH]
    assert nodes >= 1 and ran == ["CUDAExecutionProvider"] * nodes, ops
    assert not any(op in ("TopK", "ScatterElements") for op, _ in ops), ops


# ---------------------------------------------------------------------------------------------------------
# gpu: weight-only quantized experts (WeightOnlyExpertDispatch)


def _int4_initializer(name: str, packed: np.ndarray, logical: tuple[int, ...]) -> onnx.TensorProto:
    """An ONNX INT4 tensor from bytes already in ONNX's packing (two a byte, low nibble first)."""
    return helper.make_tensor(name, TensorProto.INT4, list(logical), packed.tobytes(), raw=True)


def weight_only_model(
    act: int, logits: int, quantized: dict, top_k: int, blocks: tuple[int, int] | None = None
):
    """One WeightOnlyExpertDispatch node (+ its function) over `quantized`: {gate_up, down: (values, scale)}
    as `qwen3_compile.kernels.moe.quantize_int8/4` return them (int8 [E, N, K] with scale [E, N]; packed
    uint8 [E, N, K/2] with scale [E, N, K/G]); fp32 graph inputs and output cast inside the graph."""
    inits, sizes = [], []
    experts = quantized["gate_up"][0].shape[0]
    for name in ("gate_up", "down"):
        values, scale = quantized[name]
        values, scale = values.numpy(), scale.numpy()
        if values.dtype == np.uint8:  # int4: the packed bytes as an INT4 tensor of the logical shape
            logical = (*values.shape[:2], values.shape[2] * 2)
            inits.append(_int4_initializer(name + ".q", values, logical))
        else:
            logical = values.shape
            inits.append(numpy_helper.from_array(values, name + ".q"))
            scale = scale[..., None]  # per row: [E, rows, 1], DequantizeLinear's blocked form
        inits.append(numpy_helper.from_array(scale, name + ".scale"))
        sizes.append(logical[2] // scale.shape[2])
    hidden = inits[0].dims[2]
    node = helper.make_node(
        WEIGHT_ONLY_EXPERT_DISPATCH,
        ["x", "logits", "gate_up.q", "down.q", "gate_up.scale", "down.scale"],
        ["y"],
        domain=DOMAIN,
        name="moe",
        top_k=top_k,
        normalize=1,
        activation="silu",
        gate_up_block_size=(blocks or sizes)[0],
        down_block_size=(blocks or sizes)[1],
    )
    nodes = [
        helper.make_node("Cast", ["x32"], ["x"], to=act),
        helper.make_node("Cast", ["logits32"], ["logits"], to=logits),
        node,
        helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "weight_only_expert_dispatch",
        [
            helper.make_tensor_value_info("x32", TensorProto.FLOAT, ["N", hidden]),
            helper.make_tensor_value_info("logits32", TensorProto.FLOAT, ["N", experts]),
        ],
        [helper.make_tensor_value_info("y32", TensorProto.FLOAT, ["N", hidden])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    functions = [function(WEIGHT_ONLY_EXPERT_DISPATCH, 21)]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 10  # int4
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _quantized_experts(rng, e, h, inter, kind: str, group: int, scale_dtype):
    import torch

    from qwen3_compile.kernels.moe import quantize_int4, quantize_int8

    gate_up = torch.from_numpy(rng.standard_normal((e, 2 * inter, h), dtype=np.float32) * np.float32(h**-0.5))
    down = torch.from_numpy(rng.standard_normal((e, h, inter), dtype=np.float32) * np.float32(inter**-0.5))
    if kind == "int8":
        return {name: quantize_int8(w, scale_dtype) for name, w in (("gate_up", gate_up), ("down", down))}
    return {name: quantize_int4(w, group, scale_dtype) for name, w in (("gate_up", gate_up), ("down", down))}


WEIGHT_ONLY_CASES = [
    # (act, logits dtype, weights, group, scale dtype, E, k, H, I, token counts); int4 runs the GEMV kernels
    # at every token count, int8 GEMV / single-token / mma.sync
    ("fp16", "fp32", "int8", 0, "fp16", 16, 4, 256, 128, (0, 1, 7, 300)),
    # the kernels' smallest shapes, those of the qmoe-sized MoE the artifact test quantizes
    ("fp16", "fp32", "int8", 0, "fp16", 8, 2, 128, 64, (1, 5, 37, 200, 243)),
    ("fp16", "fp32", "int4", 32, "fp16", 8, 2, 128, 64, (1, 5, 37, 200, 243)),
    ("bf16", "bf16", "int8", 0, "fp32", 128, 8, 2048, 768, (1, 16, 512)),
    ("fp16", "fp16", "int4", 128, "fp16", 128, 8, 2048, 768, (1, 16, 64)),
    ("bf16", "fp32", "int4", 32, "fp32", 16, 4, 256, 128, (1, 7, 300)),
]


@on_gpu
@pytest.mark.parametrize(
    "case", WEIGHT_ONLY_CASES, ids=lambda c: f"{c[0]}-{c[2]}g{c[3]}-scales{c[4]}-E{c[5]}k{c[6]}H{c[7]}I{c[8]}"
)
def test_weight_only_node_against_the_float64_reference(case, library):
    import torch

    from qwen3_compile.kernels.moe import moe_reference

    act_name, logits_name, kind, group, scale_name, e, k, h, inter, counts = case
    act, logits_dtype = _DTYPES[act_name], _DTYPES[logits_name]
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    scale_dtype = torch.float16 if scale_name == "fp16" else torch.float32
    quantized = _quantized_experts(rng, e, h, inter, kind, group, scale_dtype)
    session = cuda_session(weight_only_model(act, logits_dtype, quantized, k), library, profile=True)
    dt = torch.float16 if act_name == "fp16" else torch.bfloat16
    eps = float(torch.finfo(dt).eps)
    (gu, gu_s), (dn, dn_s) = quantized["gate_up"], quantized["down"]
    for n in counts:
        x = rng.standard_normal((n, h)).astype(np.float32)
        logits = rng.standard_normal((n, e)).astype(np.float32)
        out = session.run(["y32"], {"x32": x, "logits32": logits})[0]
        assert out.shape == (n, h)
        if n == 0:
            continue
        routed = torch.from_numpy(logits).to(
            {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[logits_name]
        )
        probs = torch.softmax(routed.float(), dim=-1)
        ids = torch.from_numpy(np.argsort(-probs.numpy(), axis=-1, kind="stable")[:, :k].copy())
        w = torch.gather(probs, 1, ids)
        xr = torch.from_numpy(x).to(dt)
        routing = (ids, w / w.sum(-1, keepdim=True))
        ref = moe_reference(xr, routed, gu, dn, k, True, gu_s, dn_s, routing=routing).numpy()
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        print(f"seed {seed} {case[:5]} E{e} k{k} H{h} I{inter} N={n}: rel err {rel:.3e}")
        assert np.isfinite(out).all(), f"seed {seed}, N={n}: non-finite output"
        assert rel <= 2 * eps, f"seed {seed}, N={n}: norm-wise error {rel:.3e} > 2 eps ({eps:.2e})"
    ops = profiled_ops(session)
    assert (WEIGHT_ONLY_EXPERT_DISPATCH, "CUDAExecutionProvider") in ops, ops
    assert not any(op in ("DequantizeLinear", "TopK", "Softmax") for op, _ in ops), ops


@on_gpu
@pytest.mark.parametrize(
    "group, blocks, message",
    [
        (16, None, "G=16"),  # a group size the kernels do not take
        (32, (64, 32), "disagree with the scales' shapes"),  # attributes that are not what the scales say
    ],
)
def test_refused_weight_only_nodes_fail_at_session_creation(group, blocks, message, library):
    import torch

    rng = np.random.default_rng(0)
    quantized = _quantized_experts(rng, 16, 256, 128, "int4", group, torch.float16)
    model = weight_only_model(TensorProto.FLOAT16, TensorProto.FLOAT, quantized, 4, blocks)
    with pytest.raises(Exception) as err:
        cuda_session(model, library)
    text = str(err.value)
    print(text)
    assert "qwen3_compile::WeightOnlyExpertDispatch (libqmoe_ort, node 'moe')" in text and message in text, (
        text
    )


@on_gpu
@pytest.mark.parametrize("recipe", ["int8-wo", "int4-rtn"])
def test_weight_only_artifact_with_the_library_matches_the_recipe_model(recipe, artifacts, library, tmp_path):
    """The qmoe-sized MoE quantized from its fp16 export (int4-rtn at group 32), lowered for the library:
    the same lowered graph on ORT's CUDA provider with the library (the kernels read the INT8 / INT4
    initializers) and without it on ORT's CPU provider (ORT inlines the node's function body:
    DequantizeLinear, dense experts; ORT's CUDA DequantizeLinear refuses the blocked per-row INT8 form:
    measured), fresh random prompts, prefill + greedy decode, both against the recipe's own fake-quantized
    PyTorch model in fp32 (the independent reference `validate` uses). fp16 alone moves this random-weight
    model's small logits (std 0.23) by about rel 1e-2: the same recipe model run in fp16 measures that floor,
    and, as validate's recipe check does, the library is held to twice it, and to the function body's own
    distance from the reference (on ORT CPU: rel 1.3e-2 for int8-wo, 5e-4 for int4-rtn, seed 1)."""
    import torch

    from qwen3_compile.backends.base import generate, left_padded_batch
    from qwen3_compile.lower.stage import lower_artifact
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.quantize.recipe import QuantRecipe
    from qwen3_compile.storage.manifest import read_manifest
    from qwen3_compile.tokenizer import ENDOFTEXT_ID
    from qwen3_compile.validate.recipe_reference import RecipeRunner, recipe_reference

    source = artifacts.plugin_sized_quantized(recipe)
    lowered = lower_artifact(source, tmp_path / "lowered", "ort", moe_lowering="custom-op")
    assert lowered.report.applied["quantized_experts_to_weight_only_dispatch"] == 2
    model = lowered.model_path
    with_ops = OrtRunner(model, device="cuda", custom_ops=[library])
    body = OrtRunner(model, device="cpu", custom_ops=[])
    loaded = load_model(str(artifacts.root / "moe-128-checkpoint"))
    manifest = read_manifest(source)
    chosen = QuantRecipe.from_dict(manifest.recipe, str(source))
    own = recipe_reference(loaded, source, chosen)

    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 151643, size=int(n)).tolist() for n in (1, 5, 37, 200)]
    batch = left_padded_batch(prompts, ENDOFTEXT_ID)
    real = batch.attention_mask.astype(bool)
    reference = generate(RecipeRunner(own), batch, 8)
    forced = reference.tokens
    a = generate(with_ops, batch, 8, forced=forced)
    b = generate(body, batch, 8, forced=forced)
    in_fp16 = RecipeRunner(recipe_reference(loaded, source, chosen, torch.float16))
    low = generate(in_fp16, batch, 8, forced=forced)
    lib = _logit_stats(a.prefill_logits[real], reference.prefill_logits[real])
    fn = _logit_stats(b.prefill_logits[real], reference.prefill_logits[real])
    floor = _logit_stats(low.prefill_logits[real], reference.prefill_logits[real])
    print(f"seed {seed} {recipe}: vs the recipe model, library {lib}, function body {fn}, fp16 floor {floor}")
    assert lib["rel"] <= 2 * floor["rel"], f"seed {seed}: library {lib}, fp16 floor {floor}"
    assert lib["rel"] <= 1.5 * fn["rel"] + 1e-3, f"seed {seed}: library {lib}, function body {fn}"
    assert lib["top1"] >= fn["top1"] - 0.02 and lib["top1"] >= 0.95, f"seed {seed}: {lib}, {fn}"

    profiled = _profiled_prefill(model, library, prompts[2])
    ran = [provider for op, provider in profiled_ops(profiled) if op == WEIGHT_ONLY_EXPERT_DISPATCH]
    assert ran == ["CUDAExecutionProvider"] * 2, ran
