#!/usr/bin/env python3
"""Build the TensorRT engine of this bundle on the device, with the device's own TensorRT.

    python3 build_engine.py [--output engine/model.plan] [--plugin build/plugin/libqmoe_trt_plugin.so]

Engines are specific to a TensorRT version and a GPU, so the bundle ships ONNX and this script. It checks
the device against the bundle's target (TensorRT version >= the target's minimum, the GPU's SM equal to the
target's), loads the MoE plugin library when the graph has the plugin node, parses model/model.onnx into a
strongly typed network (precisions are those of the graph's Q/DQ and casts), adds the optimisation profiles
recorded in manifest.json (prefill, decode, chunked prefill) and writes the plan. TensorRT Python API only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# no __pycache__ inside the bundle: `check` would (rightly) report it as an unlisted file
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_files import check_compatibility, read_manifest  # noqa: E402


def build(
    bundle: Path, output: Path, plugin: Path | None, workspace_gb: float | None, skip_checks: bool
) -> int:
    import tensorrt as trt

    manifest = read_manifest(bundle)
    from trt_backend import CudaRuntime, load_plugin

    if not skip_checks:
        problems = check_compatibility(manifest, trt.__version__, CudaRuntime().compute_capability())
        if problems:
            print("error: " + "; ".join(problems) + " (--skip-checks to build anyway)", file=sys.stderr)
            return 1
    logger = trt.Logger(trt.Logger.INFO)
    trt.init_libnvinfer_plugins(logger, "")
    load_plugin(trt, bundle, manifest, plugin)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle / "model" / "model.onnx")):
        for i in range(parser.num_errors):
            print(f"parser: {parser.get_error(i)}", file=sys.stderr)
        return 1
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for recorded in manifest["profiles"]:
        profile = builder.create_optimization_profile()
        for name, shape in recorded["shapes"].items():
            profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(profile)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        print("error: the TensorRT build failed (see the log above)", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(bytes(plan))
    print(f"wrote {output}: {output.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=here / "engine" / "model.plan")
    parser.add_argument(
        "--plugin",
        type=Path,
        help="MoE plugin library (default: $QWEN3_MOE_PLUGIN, else the manifest's path)",
    )
    parser.add_argument("--workspace-gb", type=float, help="builder workspace limit")
    parser.add_argument("--skip-checks", action="store_true", help="build without the version/SM check")
    args = parser.parse_args(argv)
    return build(here, args.output, args.plugin, args.workspace_gb, args.skip_checks)


if __name__ == "__main__":
    sys.exit(main())
