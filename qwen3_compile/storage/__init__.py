"""How artifacts live on disk: folders written atomically, ONNX external data, manifests."""
