"""Validation of compiled artifacts against the PyTorch reference (see stage.validate_artifact)."""
