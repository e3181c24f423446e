#!/usr/bin/env bash
# Build the MoE TensorRT plugin library (libqmoe_trt_plugin.so) on the device from plugins/moe.
# Needs CMake >= 3.24, nvcc (JetPack's CUDA toolkit) and TensorRT's headers (NvInferRuntime.h).
#   bash build_plugin.sh [SM_ARCH] [TENSORRT_INCLUDE_DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
arch="${1:-@SM_ARCH@}"
include="${2:-${TENSORRT_INCLUDE_DIR:-/usr/include/$(uname -m)-linux-gnu}}"
cmake -S "$here/plugins/moe" -B "$here/build/plugin" -DQMOE_ARCHS="$arch" -DTENSORRT_INCLUDE_DIR="$include" \
  -DCMAKE_BUILD_TYPE=Release
cmake --build "$here/build/plugin" --target qmoe_trt_plugin -j "$(nproc)"
echo "built $here/build/plugin/libqmoe_trt_plugin.so"
