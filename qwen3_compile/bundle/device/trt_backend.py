"""The TensorRT path of the bundle's runner: one engine context, the KV cache kept on the GPU, the CUDA
runtime through ctypes (no extra Python package). Written against the documented TensorRT Python API
(named-tensor API of TensorRT 10: set_input_shape / set_tensor_address / execute_async_v3, optimisation
profiles chosen per call); it cannot run where the bundle is made. Standalone: numpy and tensorrt only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from bundle_files import read_manifest


class CudaRuntime:
    """The few CUDA runtime calls the TensorRT path needs, through ctypes (no extra Python package)."""

    H2D, D2H = 1, 2

    def __init__(self):
        import ctypes

        self.ct = ctypes
        for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise SystemExit("error: the CUDA runtime (libcudart.so) is not on the library path")
        stream = ctypes.c_void_p()
        self._ok(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        self.stream = stream.value or 0

    def _ok(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with CUDA error {status}")

    def malloc(self, nbytes: int) -> int:
        ptr = self.ct.c_void_p()
        self._ok(self.lib.cudaMalloc(self.ct.byref(ptr), self.ct.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(self.ct.c_void_p(ptr))

    def copy(self, dst, src, nbytes: int, kind: int) -> None:
        args = (self.ct.c_void_p(dst), self.ct.c_void_p(src), self.ct.c_size_t(nbytes), kind)
        self._ok(self.lib.cudaMemcpyAsync(*args, self.ct.c_void_p(self.stream)), "cudaMemcpyAsync")

    def sync(self) -> None:
        self._ok(self.lib.cudaStreamSynchronize(self.ct.c_void_p(self.stream)), "cudaStreamSynchronize")

    def compute_capability(self) -> str:
        major, minor = self.ct.c_int(), self.ct.c_int()
        self.lib.cudaDeviceGetAttribute(self.ct.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
        self.lib.cudaDeviceGetAttribute(self.ct.byref(minor), 76, 0)
        return f"{major.value}.{minor.value}"


def load_plugin(trt, bundle: Path, manifest: dict, library: Path | None = None) -> None:
    """The MoE plugin library (built by build_plugin.sh) when the graph has the plugin node: `library`
    when given, else $QWEN3_MOE_PLUGIN, else the manifest's path in the bundle."""
    if manifest["moe"]["lowering"] != "plugin":
        return
    if library is None:
        library = Path(os.environ.get("QWEN3_MOE_PLUGIN", bundle / manifest["moe"]["plugin_library"]))
    if not library.is_file():
        raise SystemExit(f"error: {library} is missing: run `bash build_plugin.sh` first")
    trt.get_plugin_registry().load_library(str(library))


class TensorRTBackend:
    """One engine context; the KV cache stays on the GPU (present.* of one call are the next call's
    past_key_values.*); only the last row of the logits is copied back."""

    name = "trt"

    def __init__(self, bundle: Path, engine_path: Path | None = None):
        import tensorrt as trt

        manifest = read_manifest(bundle)
        self.cuda = CudaRuntime()
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        load_plugin(trt, bundle, manifest)
        plan = (engine_path or bundle / "engine" / "model.plan").read_bytes()
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise SystemExit("error: TensorRT could not deserialize the engine (built by another version?)")
        self.context = self.engine.create_execution_context()
        self.trt, self.profile = trt, None
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        expected = {
            "logits",
            *(n.replace("past_key_values.", "present.") for n in self.inputs if "past" in n),
        }
        if set(self.outputs) != expected:
            raise SystemExit(f"error: the engine's outputs {sorted(self.outputs)} are not logits + present.*")
        self.layers = sum(n.startswith("past_key_values.") for n in self.inputs) // 2
        key = self.engine.get_tensor_shape("past_key_values.0.key")
        self.kv_shape = (key[1], key[3])  # heads, head_dim
        # (min, max) per input and profile, from the engine: build_engine.py builds three, trtexec one
        self.profiles = [
            {n: tuple(self.engine.get_tensor_profile_shape(n, i))[0::2] for n in self.inputs}
            for i in range(self.engine.num_optimization_profiles)
        ]
        # Device memory is allocated here, once, at the largest shapes the profiles admit: a cudaMalloc and
        # cudaFree (which waits for the device) per tensor and token would cost more than a decode step.
        # Each KV tensor has two buffers: a call reads its past from one and writes its present into the
        # other, and the next call swaps them. The logits buffer grows when a call needs more.
        host_inputs = ("input_ids", "attention_mask", "position_ids")
        self.buffers = {n: self.cuda.malloc(self._largest_bytes(n)) for n in host_inputs}
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        kv_tokens = max(r[self.past_names[0]][1][2] + r["input_ids"][1][1] for r in self.profiles)
        kv_bytes = self._bytes(self.past_names[0], (1, key[1], kv_tokens, key[3]))
        self.kv = {n: [self.cuda.malloc(kv_bytes), self.cuda.malloc(kv_bytes)] for n in self.past_names}
        self.side, self.past_len = 0, 0
        self.logits_buffer, self.logits_bytes = None, 0

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def _bytes(self, name: str, shape: tuple) -> int:
        return int(np.prod(shape)) * self._dtype(name).itemsize

    def _largest_bytes(self, name: str) -> int:
        """Bytes of input `name` at the largest shape any optimisation profile admits."""
        return max(self._bytes(name, ranges[name][1]) for ranges in self.profiles)

    def close(self) -> None:
        """Frees the device buffers (the process exit would too)."""
        pointers = [*self.buffers.values(), *(p for pair in self.kv.values() for p in pair)]
        if self.logits_buffer is not None:
            pointers.append(self.logits_buffer)
        for ptr in pointers:
            self.cuda.free(ptr)
        self.buffers, self.kv, self.logits_buffer = {}, {}, None

    def _profile_for(self, shapes: dict[str, tuple]) -> int:
        """The first of the engine's profiles whose ranges admit these input shapes."""
        for index, ranges in enumerate(self.profiles):
            if all(
                all(lo <= v <= hi for lo, v, hi in zip(ranges[n][0], s, ranges[n][1], strict=True))
                for n, s in shapes.items()
            ):
                return index
        raise SystemExit(f"error: no optimisation profile admits {shapes}; rebuild with a larger --max-seq")

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        heads, head_dim = self.kv_shape
        host = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        shapes = {n: a.shape for n, a in host.items()}
        shapes |= {n: (1, heads, self.past_len, head_dim) for n in self.past_names}
        index = self._profile_for(shapes)
        if index != self.profile:
            self.context.set_optimization_profile_async(index, self.cuda.stream)
            self.profile = index
        for name, shape in shapes.items():
            self.context.set_input_shape(name, shape)
        staged = []  # the host arrays must live until their copies ran (the sync below)
        for name, array in host.items():
            array = np.ascontiguousarray(array.astype(self._dtype(name)))
            self.cuda.copy(self.buffers[name], array.ctypes.data, array.nbytes, self.cuda.H2D)
            self.context.set_tensor_address(name, self.buffers[name])
            staged.append(array)
        for name in self.past_names:
            past, present = self.kv[name][self.side], self.kv[name][1 - self.side]
            self.context.set_tensor_address(name, past)
            self.context.set_tensor_address(name.replace("past_key_values.", "present."), present)
        shape = tuple(self.context.get_tensor_shape("logits"))
        nbytes = self._bytes("logits", shape)
        if nbytes > self.logits_bytes:
            if self.logits_buffer is not None:
                self.cuda.free(self.logits_buffer)
            self.logits_buffer, self.logits_bytes = self.cuda.malloc(nbytes), nbytes
        self.context.set_tensor_address("logits", self.logits_buffer)
        if not self.context.execute_async_v3(self.cuda.stream):
            raise RuntimeError("TensorRT execution failed")
        dtype = self._dtype("logits")
        vocab = shape[-1]
        last = np.empty(vocab, dtype)
        offset = (int(np.prod(shape)) - vocab) * dtype.itemsize  # the last row of [1, S, V] (or [1, 1, V])
        self.cuda.copy(last.ctypes.data, self.logits_buffer + offset, last.nbytes, self.cuda.D2H)
        self.cuda.sync()  # the staged host arrays may go now
        self.side = 1 - self.side  # this call's present is the next call's past
        self.past_len += ids.shape[1]
        return last.astype(np.float32)
