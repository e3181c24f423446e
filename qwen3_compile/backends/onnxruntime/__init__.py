"""ONNX Runtime: session settings (what an artifact's manifest asks for) and the runner."""
