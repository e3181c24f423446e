"""TensorRT and TensorRT-RTX: the one import shim that picks the flavour, and the engine runner."""
