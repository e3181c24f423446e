"""The qmoe MoE plugin as a Python IPluginV3 (V3One core/build/runtime) for TensorRT and TensorRT-RTX.

Register it before parsing an ONNX model whose MoE blocks were lowered to the plugin node
(`trt_contract.make_node`); the parser then imports each node as this plugin and the builder calls its
build-time methods (output types and shapes, format support, workspace size), so an engine with the
plugin builds where TensorRT-RTX runs: on a CPU-only machine too.

    import tensorrt_rtx as trt
    from qwen3_compile.kernels.trt_python_plugin import register
    register(trt)                       # once per process, before trt.OnnxParser(...).parse(...)

`enqueue` calls libqmoe's `qmoe_forward` through ctypes (the same binding the GPU tests use). No engine
can run on this project's machines (no full TensorRT; TensorRT-RTX refuses SM 9.0), so that path has
not been executed inside TensorRT; the kernels it calls are tested on their own (tests/kernels).

TensorRT-RTX 1.7.1 from PyPI: when its ONNX parser imports any plugin node it dlopen()s
`libtensorrt_rtx.so`, a name the wheel does not ship (only `libtensorrt_rtx.so.1`); the failed dlopen
throws inside a noexcept function and the process aborts ("terminate called without an active
exception") before any plugin callback runs. `register` makes that name resolvable first
(`ensure_rtx_core_library`): see plugins/README.md.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

from . import trt_contract as contract

_KEEP_ALIVE: dict[str, object] = {}  # TensorRT holds raw pointers to these: never let them be collected


class PluginSetupError(RuntimeError):
    """The plugin cannot be registered in this process; the message says why and how to fix it."""


# --------------------------------------------------------------------------------------------------
# TensorRT-RTX's unversioned core-library name.


def ensure_rtx_core_library(trt: ModuleType) -> str:
    """Make `dlopen("libtensorrt_rtx.so")` succeed in this process (TensorRT-RTX only).

    Returns how: "not needed" (standard TensorRT), "on the search path", or the path of a tiny shim
    library whose SONAME is `libtensorrt_rtx.so` and which depends on the loaded `libtensorrt_rtx.so.1`
    (glibc matches a dlopen name against loaded objects' SONAMEs, so the parser's dlopen returns the
    shim and its dlsym finds the real library's symbols through the shim's dependency). The shim is
    compiled once with the host C compiler into the kernel cache.
    """
    if trt.__name__ != "tensorrt_rtx":
        return "not needed"
    if "rtx_shim" in _KEEP_ALIVE:
        return str(_KEEP_ALIVE["rtx_shim"]._name)
    try:
        ctypes.CDLL("libtensorrt_rtx.so")
        return "on the search path"
    except OSError:
        pass
    real = _rtx_core_library_path()
    shim = _build_rtx_shim(real)
    _KEEP_ALIVE["rtx_shim"] = ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    try:
        ctypes.CDLL("libtensorrt_rtx.so")
    except OSError as err:  # the SONAME match did not happen: say so rather than abort in the parser
        raise PluginSetupError(
            f"loaded {shim} but 'libtensorrt_rtx.so' still does not resolve: {err}"
        ) from err
    return str(shim)


def _rtx_core_library_path() -> Path:
    try:
        import tensorrt_rtx_libs
    except ImportError as err:
        raise PluginSetupError("tensorrt_rtx is imported but its tensorrt_rtx_libs package is not") from err
    found = sorted(Path(tensorrt_rtx_libs.__file__).parent.glob("libtensorrt_rtx.so.*"))
    if not found:
        raise PluginSetupError(f"no libtensorrt_rtx.so.* in {Path(tensorrt_rtx_libs.__file__).parent}")
    return found[0]


def _build_rtx_shim(real: Path) -> Path:
    from .build import default_cache_dir

    stat = real.stat()
    key = hashlib.sha256(f"{real.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out_dir = default_cache_dir() / f"trt-rtx-shim-{key}"
    shim = out_dir / "libtensorrt_rtx.so"
    if shim.is_file():
        return shim
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise PluginSetupError(
            "TensorRT-RTX's ONNX parser dlopen()s 'libtensorrt_rtx.so', which the PyPI wheel does not ship, "
            "and no C compiler is here to build the shim that provides the name. Fix: make a link "
            f"'libtensorrt_rtx.so' -> {real} in a folder on LD_LIBRARY_PATH before starting Python."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "empty.c"
    src.write_text("/* SONAME shim: libtensorrt_rtx.so -> libtensorrt_rtx.so.N (qwen3_compile) */\n")
    tmp = out_dir / f"libtensorrt_rtx.so.tmp{id(src)}"
    cmd = [cc, "-shared", "-fPIC", "-o", str(tmp), str(src), "-Wl,-soname,libtensorrt_rtx.so"]
    cmd += ["-Wl,--no-as-needed", str(real), f"-Wl,-rpath,{real.parent}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PluginSetupError(f"building the libtensorrt_rtx.so shim failed: {' '.join(cmd)}\n{proc.stderr}")
    tmp.replace(shim)
    return shim


# --------------------------------------------------------------------------------------------------
# The plugin and its creator (classes are made per TensorRT module: their bases come from it).


def _field_value(field) -> object:
    import numpy as np

    data = np.asarray(field.data)
    if field.type == type(field.type).CHAR:
        raw = data.astype(np.uint8).tobytes()
        return raw.split(b"\0", 1)[0].decode()
    return data.ravel()[0].item() if data.size else None


def attributes_from_fields(fields) -> contract.MoeAttributes:
    """MoeAttributes from a PluginFieldCollection (the node's attributes, or an engine's fields)."""
    values = {f.name: _field_value(f) for f in fields}
    unknown = set(values) - set(contract.ATTRIBUTES)
    if unknown:
        raise ValueError(f"{contract.PLUGIN_NAME}: unknown attribute(s) {sorted(unknown)}")
    if "top_k" not in values:
        raise ValueError(f"{contract.PLUGIN_NAME}: attribute top_k is required")
    attrs = contract.MoeAttributes(
        top_k=int(values["top_k"]),
        normalize=bool(values.get("normalize", 1)),
        activation=str(values.get("activation", "silu")),
    )
    attrs.check()
    return attrs


@functools.cache
def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """(plugin class, creator class) for the `tensorrt` or `tensorrt_rtx` module `trt`."""
    import numpy as np

    DT = trt.DataType
    act_types = (DT.HALF, DT.BF16)
    FIELD_TYPES = (trt.PluginFieldType.INT32, trt.PluginFieldType.INT32, trt.PluginFieldType.CHAR)

    def make_fields(data) -> object:
        """(top_k, normalize, activation) fields over `data`, which the caller must keep alive."""
        names = ("top_k", "normalize", "activation")
        return trt.PluginFieldCollection(
            [trt.PluginField(n, d, t) for n, d, t in zip(names, data, FIELD_TYPES, strict=True)]
        )

    qmoe_dtype = {DT.FLOAT: 0, DT.HALF: 1, DT.BF16: 2, DT.INT8: 3, DT.INT4: 4}
    quantized_types = (DT.INT8, DT.INT4)

    def group_size(weight_type, gate_up_dims, gate_up_scale_dims) -> int:
        """INT4: input channels a scale (gate_up [E, 2I, H], scales [E, 2I, H/G]); 0 for other weights."""
        if weight_type != DT.INT4:
            return 0
        return int(gate_up_dims[2]) // int(gate_up_scale_dims[2])

    class Qwen3MoePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: contract.MoeAttributes, library: str | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 1
            self.plugin_name = contract.PLUGIN_NAME
            self.plugin_version = contract.PLUGIN_VERSION
            self.plugin_namespace = contract.PLUGIN_NAMESPACE
            self.attrs = attrs
            self.library = library
            self.log: list[str] = []  # build-time callbacks seen (for tests and debugging)

        # -- core / clone -----------------------------------------------------------------------
        def get_capability_interface(self, type):
            return self

        def clone(self):
            twin = Qwen3MoePlugin(self.attrs, self.library)
            twin.log = self.log  # shared on purpose: one record per node
            return twin

        # -- build ------------------------------------------------------------------------------
        def get_output_data_types(self, input_types):
            self.log.append("get_output_data_types")
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            self.log.append("get_output_shapes")
            if len(inputs) not in (4, 6):
                raise ValueError(f"{contract.PLUGIN_NAME} takes 4 or 6 inputs, got {len(inputs)}")
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            t, hidden_t = desc.type, in_out[0].desc.type
            if pos == 0:
                return t in act_types
            if pos == 1:
                return t in (DT.FLOAT, DT.HALF, DT.BF16)
            if pos == 2:
                return t == hidden_t or (t in quantized_types and num_inputs == 6)
            if pos == 3:
                return t == in_out[2].desc.type
            if pos == 4 and num_inputs == 6:
                return t in (DT.FLOAT, DT.HALF)
            if pos == 5 and num_inputs == 6:
                return t == in_out[4].desc.type
            return t == hidden_t  # the output

        def configure_plugin(self, inp, out):
            dims = [tuple(d.desc.dims) for d in inp]
            self.log.append(f"configure_plugin {dims}")
            E, two_i, H = dims[2]
            contract.check_shapes(E, H, two_i // 2, self.attrs.top_k)
            if inp[2].desc.type == DT.INT4:  # per-group scales [E, 2I, H/G], [E, H, I/G], one G
                (_, _, groups_up), (_, _, groups_down) = dims[4], dims[5]
                g = H // groups_up
                if g not in contract.INT4_GROUP_SIZES or g * groups_up != H or g * groups_down != two_i // 2:
                    raise ValueError(
                        f"{contract.PLUGIN_NAME}: int4 scales {dims[4]}, {dims[5]} are not per group of G in "
                        f"{contract.INT4_GROUP_SIZES} input channels"
                    )

        def get_workspace_size(self, inp, out):
            T = max(1, inp[0].max[0])  # the profile's largest token count
            E, two_i, H = tuple(inp[2].desc.dims)
            size = contract.workspace_bytes(T, E, self.attrs.top_k, H, two_i // 2)
            self.log.append(f"get_workspace_size {size}")
            return size

        # -- runtime ----------------------------------------------------------------------------
        def on_shape_change(self, inp, out):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            # PluginField keeps a raw pointer to its data: the arrays must outlive the collection, so
            # they live on the plugin (a temporary array is freed, and TensorRT would serialise garbage).
            a = self.attrs
            self._field_data = (
                np.array([a.top_k], np.int32),
                np.array([int(a.normalize)], np.int32),
                np.frombuffer(a.activation.encode() + b"\0", np.int8).copy(),
            )
            self._fields = make_fields(self._field_data)
            return self._fields

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from . import moe  # ctypes binding of libqmoe

            lib = moe.load_library(self.library)
            T, H = input_desc[0].dims[0], input_desc[0].dims[1]
            E, two_i = input_desc[2].dims[0], input_desc[2].dims[1]
            quantized = len(inputs) == 6
            group = group_size(input_desc[2].type, input_desc[2].dims, input_desc[4].dims) if quantized else 0
            prob = moe._Problem(
                num_tokens=T,
                num_experts=E,
                top_k=self.attrs.top_k,
                hidden=H,
                inter=two_i // 2,
                act_dtype=qmoe_dtype[input_desc[0].type],
                weight_dtype=qmoe_dtype[input_desc[2].type],
                scale_dtype=qmoe_dtype[input_desc[4].type] if quantized else 0,
                logits_dtype=qmoe_dtype[input_desc[1].type],
                normalize=int(self.attrs.normalize),
                path=0,
                group_size=group,
            )
            ws = (int(workspace) + 255) // 256 * 256
            need = contract.workspace_bytes(T, E, self.attrs.top_k, H, two_i // 2) - 256
            ten = moe._Tensors(
                x=inputs[0],
                logits=inputs[1],
                gate_up=inputs[2],
                down=inputs[3],
                gate_up_scale=inputs[4] if quantized else None,
                down_scale=inputs[5] if quantized else None,
                out=outputs[0],
                workspace=ws,
                workspace_bytes=need,
            )
            status = lib.qmoe_forward(ctypes.byref(prob), ctypes.byref(ten), ctypes.c_void_p(stream))
            if status != 0:
                raise RuntimeError(f"qmoe_forward: {lib.qmoe_error_string(status).decode()} ({status})")
            return 0

    class Qwen3MoeCreator(trt.IPluginCreatorV3One):
        def __init__(self, library: str | None = None):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = contract.PLUGIN_NAME
            self.plugin_version = contract.PLUGIN_VERSION
            self.plugin_namespace = contract.PLUGIN_NAMESPACE
            self._field_data = (np.array([], np.int32), np.array([], np.int32), np.array([], np.int8))
            self.field_names = make_fields(self._field_data)
            self.library = library
            self.created: list[object] = []  # every plugin handed to TensorRT (kept alive, inspectable)

        def create_plugin(self, name, fc, phase):
            plugin = Qwen3MoePlugin(attributes_from_fields(fc), self.library)
            self.created.append(plugin)
            return plugin

    return Qwen3MoePlugin, Qwen3MoeCreator


def register(trt: ModuleType, library: str | None = None):
    """Register the plugin creator with `trt`'s plugin registry (once per process); returns the creator.

    `library`: libqmoe to call at run time (default: `$QWEN3_COMPILE_QMOE_LIB`, else built for the GPU).
    """
    key = f"creator:{trt.__name__}"
    if key in _KEEP_ALIVE:
        return _KEEP_ALIVE[key]
    ensure_rtx_core_library(trt)
    creator = plugin_classes(trt)[1](library)
    registry = trt.get_plugin_registry()
    if not registry.register_creator(creator, contract.PLUGIN_NAMESPACE):
        raise PluginSetupError(
            f"the plugin registry refused {contract.PLUGIN_NAMESPACE}::{contract.PLUGIN_NAME} "
            f"v{contract.PLUGIN_VERSION} (another creator with that name and version is registered?)"
        )
    _KEEP_ALIVE[key] = creator
    return creator
