"""The targets `bundle` makes bundles for (light: the CLI imports it for its option choices)."""

JETSON_TARGETS = ("jetson-orin-nano", "jetson-agx-orin", "jetson-thor")
