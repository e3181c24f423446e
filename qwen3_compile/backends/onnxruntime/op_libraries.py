"""ONNX Runtime custom-op libraries for the `ort-cuda` backend: `libqmoe_ort.so` (plugins/moe/ort, built with
CMake against the user's ORT release) runs the canonical graph's `qwen3_compile::ExpertDispatch` nodes, and
the `WeightOnlyExpertDispatch` nodes that `lower --for ort --moe-lowering custom-op` writes for INT8/INT4
experts, on the project's CUDA kernels instead of ORT inlining the nodes' ONNX function bodies.

Which libraries a CUDA session registers: those given to `OrtRunner(custom_ops=...)`, else the paths in
`$QWEN3_COMPILE_ORT_OPS` (separated by `os.pathsep`), which `validate`/`run --ort-ops PATH` set. CPU sessions
never register them: the library's kernels are CUDA kernels, and once a library claims a node's op ORT no
longer falls back to the function body, so a CPU session would have no implementation for it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwen3_compile.errors import BadInputError

ORT_OPS_ENV = "QWEN3_COMPILE_ORT_OPS"
ORT_OPS_FIELD = f"--ort-ops / ${ORT_OPS_ENV}"
BUILD_FIX = (
    "build it with `cmake -S plugins/moe -B build/qmoe -DORT_INCLUDE_DIR=<folder with onnxruntime_c_api.h> "
    "&& cmake --build build/qmoe --target qmoe_ort` (plugins/README.md, ONNX Runtime custom op) and pass "
    f"build/qmoe/libqmoe_ort.so, or drop --ort-ops and unset ${ORT_OPS_ENV}."
)


def custom_op_libraries(device: str, given: list | tuple | None = None) -> tuple[Path, ...]:
    """What a session on `device` registers: `given`, else $QWEN3_COMPILE_ORT_OPS; nothing on the CPU."""
    if device != "cuda":
        return ()
    if given is not None:
        return tuple(Path(p) for p in given)
    value = os.environ.get(ORT_OPS_ENV, "")
    return tuple(Path(p) for p in value.split(os.pathsep) if p.strip())


@contextmanager
def selected_custom_ops(path: Path | None, backend: str | None) -> Iterator[None]:
    """`--ort-ops PATH` on a command: checked now, then registered by every CUDA session opened inside the
    block (the runner and the bisection) through $QWEN3_COMPILE_ORT_OPS, which is restored afterwards."""
    if path is None:
        yield
        return
    if backend != "ort-cuda":
        raise BadInputError(
            "--ort-ops registers an ONNX Runtime CUDA custom-op library; the backend is "
            f"{backend or 'the default (ort, CPU)'}.",
            field="--ort-ops",
            fix="add --backend ort-cuda, or drop --ort-ops.",
        )
    check_library(Path(path))
    before = os.environ.get(ORT_OPS_ENV)
    os.environ[ORT_OPS_ENV] = str(Path(path).resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ORT_OPS_ENV, None)
        else:
            os.environ[ORT_OPS_ENV] = before


def check_library(path: Path) -> None:
    if not path.is_file():
        raise BadInputError(
            "the ONNX Runtime custom-op library does not exist"
            + (" (it is a folder)." if path.is_dir() else "."),
            file=path,
            field=ORT_OPS_FIELD,
            fix=BUILD_FIX,
        )


def register_custom_ops(options, libraries: tuple[Path, ...]) -> None:
    """Register each library with the session options (ORT dlopens it and calls its RegisterCustomOps)."""
    for path in libraries:
        check_library(path)
        try:
            options.register_custom_ops_library(str(path))
        except Exception as err:  # ORT raises its own pybind error types; the message names the cause
            raise BadInputError(
                f"ONNX Runtime could not load the custom-op library: {err}",
                file=path,
                field=ORT_OPS_FIELD,
                fix="pass a libqmoe_ort.so built for this machine (its CPU architecture, a CUDA major the "
                "driver supports) and use ONNX Runtime >= 1.18; " + BUILD_FIX,
            ) from None


def session_error(err: Exception, libraries: tuple[Path, ...], model_path) -> Exception:
    """A session that failed to open because of a registered library, as the error users see (exit code 2):
    the library refuses the node (a shape or dtype its kernels do not run) or has no kernel for its types."""
    text = str(err)
    if not libraries or not any(s in text for s in ("ExpertDispatch", "libqmoe_ort", "qwen3_compile")):
        return err
    return BadInputError(
        f"ONNX Runtime could not run the model with the custom-op library "
        f"{', '.join(str(p) for p in libraries)}: {text}",
        file=model_path,
        field=ORT_OPS_FIELD,
        fix="the library runs fp16/bf16 ExpertDispatch and WeightOnlyExpertDispatch (INT8, INT4 in groups of "
        "32/64/128) nodes with H % 128 == 0, I % 64 == 0, E <= 256, top_k <= 32 (plugins/README.md); for "
        "other models drop --ort-ops and unset "
        f"${ORT_OPS_ENV} (ORT then runs the node's ONNX function body).",
    )


def describe_libraries(libraries: tuple[Path, ...]) -> list[dict[str, str]]:
    """What a report records of the libraries a session ran with: path and sha256."""
    return [{"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in libraries]
