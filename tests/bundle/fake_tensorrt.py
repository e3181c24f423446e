"""A simulated TensorRT runtime and CUDA memory, to check the runner's TensorRT-path bookkeeping where no
engine can run: optimisation profile per call, input shapes inside the active profile, device buffers
(allocation, host<->device copies at offsets, the KV cache handed from present.* to past_key_values.*,
nothing leaked or freed twice), the last logits row. The "engine" executes the bundle's ONNX graph on
ONNX Runtime. It proves nothing about TensorRT itself.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import onnxruntime as ort

_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class FakeCuda:
    H2D, D2H = 1, 2

    def __init__(self):
        self.buffers: dict[int, bytearray] = {}
        self.next, self.stream, self.mallocs = 1 << 40, 7, 0

    def malloc(self, nbytes: int) -> int:
        self.mallocs += 1
        ptr, self.next = self.next, self.next + (1 << 32)
        self.buffers[ptr] = bytearray(max(nbytes, 1))
        return ptr

    def free(self, ptr: int) -> None:
        del self.buffers[ptr]  # KeyError: a double free or a pointer that was never allocated

    def _at(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        base = max(b for b in self.buffers if b <= ptr)
        assert ptr - base + nbytes <= len(self.buffers[base]), "copy past the end of a device buffer"
        return self.buffers[base], ptr - base

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if kind == self.H2D:
            buf, off = self._at(dst, nbytes)
            buf[off : off + nbytes] = ctypes.string_at(src, nbytes)
        else:
            buf, off = self._at(src, nbytes)
            ctypes.memmove(dst, bytes(buf[off : off + nbytes]), nbytes)

    def read(self, ptr: int, shape: tuple, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf, off = self._at(ptr, nbytes)
        return np.frombuffer(bytes(buf[off : off + nbytes]), dtype=dtype).reshape(shape)

    def sync(self) -> None:
        pass


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.profile, self.shapes, self.addresses = engine, None, {}, {}
        self.profiles_used: list[int] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> None:
        self.profile = index
        self.profiles_used.append(index)

    def set_input_shape(self, name: str, shape: tuple) -> None:
        ranges = self.engine.profiles[self.profile]["shapes"][name]
        assert all(lo <= d <= hi for lo, d, hi in zip(ranges["min"], shape, ranges["max"], strict=True)), (
            f"{name} {shape} outside profile {self.profile}"
        )
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name: str) -> tuple:
        if name in self.shapes:
            return self.shapes[name]
        batch, seq = self.shapes["input_ids"]
        if name == "logits":
            return (batch, 1, self.engine.vocab)  # the deployment graph: newest token only
        past = self.shapes[name.replace("present.", "past_key_values.")]
        return (past[0], past[1], past[2] + seq, past[3])

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def execute_async_v3(self, stream: int) -> bool:
        cuda = self.engine.cuda
        feeds = {
            i.name: cuda.read(self.addresses[i.name], self.shapes[i.name], _TYPES[i.type])
            for i in self.engine.session.get_inputs()
        }
        outputs = self.engine.session.run(None, feeds)
        for meta, value in zip(self.engine.session.get_outputs(), outputs, strict=True):
            assert value.shape == self.get_tensor_shape(meta.name), meta.name
            data = np.ascontiguousarray(value)
            buf, off = cuda._at(self.addresses[meta.name], data.nbytes)
            buf[off : off + data.nbytes] = data.tobytes()
        return True


class FakeEngine:
    def __init__(self, session: ort.InferenceSession, profiles: list[dict], cuda: FakeCuda):
        self.session, self.profiles, self.cuda = session, profiles, cuda
        self.io = [(i, "INPUT") for i in session.get_inputs()] + [
            (o, "OUTPUT") for o in session.get_outputs()
        ]
        self.num_io_tensors = len(self.io)
        self.vocab = session.get_outputs()[0].shape[-1]
        self.contexts: list[FakeContext] = []

    def _meta(self, name: str):
        return next((m, mode) for m, mode in self.io if m.name == name)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0].name

    def get_tensor_mode(self, name: str) -> str:
        return self._meta(name)[1]

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple(d if isinstance(d, int) else -1 for d in self._meta(name)[0].shape)

    def get_tensor_dtype(self, name: str):
        return _TYPES[self._meta(name)[0].type]

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple]:
        shapes = self.profiles[index]["shapes"][name]
        return [tuple(shapes[k]) for k in ("min", "opt", "max")]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt_module(session: ort.InferenceSession, profiles: list[dict], cuda: FakeCuda):
    """A stand-in `tensorrt` module exposing the calls the runner makes."""
    trt = types.ModuleType("tensorrt")
    trt.engines = []

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine:
            trt.engines.append(FakeEngine(session, profiles, cuda))
            return trt.engines[-1]

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    trt.nptype = lambda dtype: dtype
    trt.plugin_libraries = []
    trt.get_plugin_registry = lambda: types.SimpleNamespace(load_library=trt.plugin_libraries.append)
    return trt
