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
import os
import stat
import sys
import time
from pathlib import Path

# no __pycache__ inside the bundle: `check` would (rightly) report it as an unlisted file
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_files import FIX_FOLDER, BundleError, check_compatibility, read_manifest, tree_files  # noqa: E402


def write_new_file(root: str | Path, path: str | Path, data: bytes) -> None:
    """Write `data` to `path` without following a link: its folders inside `root` must be real folders
    (lstat), the bytes go to a new file (O_EXCL, O_NOFOLLOW) renamed over `path`; a link at `path` is
    refused rather than replaced."""
    root, path = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    check_output_path(root, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_output_path(root, path)  # again: nothing raced a link in while the folders were made
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(partial, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def check_output_path(root: str | Path, path: str | Path) -> None:
    """Refuse `path` when it, or a folder between `root` and it, is a link or not what it should be (lstat,
    never followed). Paths outside `root` are the user's choice and are not checked."""
    root, path = Path(os.path.abspath(root)), Path(os.path.abspath(path))  # '..' resolved by name
    if root not in path.parents:
        return
    where = path.relative_to(root).as_posix()
    for parent in reversed(path.parents):
        if parent == root or root not in parent.parents:
            continue
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            break
        if not stat.S_ISDIR(st.st_mode):  # a link (even to a folder) or a file
            name = parent.relative_to(root).as_posix()
            problem = f"{name} is a link or a file, not a folder: refused to write through it"
            raise BundleError(problem, file=where, fix=FIX_FOLDER)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        problem = "exists as a link, a hard link or a special file: refused to write through it"
        raise BundleError(problem, file=where, fix=FIX_FOLDER)


def build(
    bundle: Path, output: Path, plugin: Path | None, workspace_gb: float | None, skip_checks: bool
) -> int:
    # before a build that can take an hour: no link anywhere in the bundle, none on the way to the plan
    tree_files(bundle)
    check_output_path(bundle, output)
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
    write_new_file(bundle, output, bytes(plan))
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
    try:
        return build(here, args.output, args.plugin, args.workspace_gb, args.skip_checks)
    except BundleError as err:
        print(f"error: in {here}: {err}. Fix: {err.fix}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
