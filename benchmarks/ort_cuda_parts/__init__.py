"""The parts of benchmarks/ort_cuda.py (its `--parts`), one module a group of parts; ort_cuda.py is the
command."""
