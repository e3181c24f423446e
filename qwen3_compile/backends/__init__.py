"""Runtimes that execute compiled artifacts, one folder each (`onnxruntime/`, `tensorrt/`), the PyTorch
reference, and one registry (`registry.open_runner`) that validate, run and the benchmarks use.

Only this package (plus `kernels/` and the standalone bundle files) imports onnxruntime, tensorrt or
tensorrt_rtx; a test scans the imports."""
