"""ONNX -> a strongly typed TensorRT network, with plugin libraries loaded first.

Parser errors become one message that names the ONNX node, its op and, for nodes inside a local
function (ExpertDispatch's body), the function call stack, so a user can find the node in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from qwen3_compile.engine.log import BuildLog, trt_logger
from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.manifest import sha256_file


@dataclass(frozen=True)
class ParsedNetwork:
    builder: object
    network: object
    parser: object  # kept alive: the network references the parser's weights

    def inputs(self) -> list[tuple[str, tuple[int, ...]]]:
        net = self.network
        return [(net.get_input(i).name, tuple(net.get_input(i).shape)) for i in range(net.num_inputs)]


def load_plugin_libraries(trt: ModuleType, libraries: list[Path], log: BuildLog) -> dict[str, str]:
    """Register each library's plugin creators with TensorRT; returns {path: sha256} for the manifest."""
    hashes = {}
    if libraries and trt.__name__ == "tensorrt_rtx":
        # TensorRT-RTX 1.7.1's parser dlopen()s 'libtensorrt_rtx.so' (a name the wheel lacks) when it
        # imports a plugin node and aborts the process if that fails: provide the name first
        from qwen3_compile.kernels.trt_python_plugin import ensure_rtx_core_library

        log.note(f"libtensorrt_rtx.so for the parser: {ensure_rtx_core_library(trt)}")
    registry = trt.get_plugin_registry()
    for library in libraries:
        library = Path(library)
        if not library.is_file():
            raise BadInputError(
                "the plugin library does not exist.", file=library, field="--plugin", fix="pass a built .so."
            )
        try:
            handle = registry.load_library(str(library))
        except Exception as err:  # the bindings raise on a missing entry point or unresolved symbol
            handle, detail = None, f" ({err})"
        else:
            detail = ""
        if handle is None:
            raise BadInputError(
                f"TensorRT could not load the plugin library{detail}; see the build log.",
                file=library,
                field="--plugin",
                fix="build the library against this TensorRT flavour and version (exporting getCreators).",
            )
        hashes[str(library)] = sha256_file(library)
        log.note(f"loaded plugin library {library}")
    return hashes


def _describe_error(error) -> str:
    node = error.node_name() or (f"#{error.node()}" if error.node() >= 0 else "?")
    text = f"node '{node}' (op {error.node_operator() or '?'}): {error.desc()}"
    stack = [error.local_function_stack()[i] for i in range(error.local_function_stack_size())]
    if stack:
        text += f" [inside local function call(s) {' > '.join(stack)}]"
    return text


def parse_onnx(trt: ModuleType, model_path: Path, log: BuildLog) -> ParsedNetwork:
    """Parse `model_path` (external data beside it) into a strongly typed network."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # standard TensorRT asks for it; TensorRT-RTX networks are strongly typed always
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(model_path))
    errors = [_describe_error(parser.get_error(i)) for i in range(parser.num_errors)]
    for error in errors:
        log.write("ERROR", f"parser: {error}")
    if not ok or errors:
        raise BadInputError(
            f"TensorRT's ONNX parser rejected the graph: {'; '.join(errors) or 'no error recorded'}.",
            file=model_path,
            fix="a lowering for this target must replace the node (see `qwen3-compile build --help` for "
            "--moe-lowering), or the op needs a newer TensorRT.",
        )
    log.note(f"parsed {model_path.name}: {network.num_layers} layers, {network.num_inputs} inputs")
    return ParsedNetwork(builder, network, parser)
