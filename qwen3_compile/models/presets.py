"""Model presets: named architectures from `presets.toml`, instantiated with random weights, and the
trained test models shipped in `models/trained/`.

A random preset names an architecture, not weights (no Qwen3 weights can be downloaded here). Tiny presets
are the CI workhorses; real presets carry the published shapes and can be cut to a few layers. A trained
preset (`checkpoint = "trained/NAME"`) is a small checkpoint in the package, trained by
`tools/train_test_models.py`: it loads like any checkpoint directory, and its architecture is its config.json.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from qwen3_compile.errors import BadInputError
from qwen3_compile.models.config import Qwen3Arch

DEFAULT_PRESET = "tiny-moe"
_META_KEYS = {
    "description",
    "seed",
    "inherit",
    "published_params_b",
    "published_active_b",
    "published_non_embedding_b",
    "outlier_channels",
    "outlier_scale",
    "checkpoint",
}
_ARCH_FIELDS = {f.name for f in dataclasses.fields(Qwen3Arch)}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    arch: Qwen3Arch
    seed: int = 0
    published_params_b: float | None = None
    published_active_b: float | None = None
    published_non_embedding_b: float | None = None
    outlier_channels: tuple[int, ...] | None = None  # massive activation channels (models/outliers.py)
    outlier_scale: float | None = None
    checkpoint: str | None = None  # package-relative folder of a trained model's weights

    @property
    def checkpoint_dir(self):
        if self.checkpoint is None:
            return None
        return Path(str(resources.files("qwen3_compile.models").joinpath(self.checkpoint)))

    @property
    def outliers(self):
        from qwen3_compile.models.outliers import ActivationOutliers

        if not self.outlier_channels:
            return None
        return ActivationOutliers(
            tuple(self.outlier_channels), self.outlier_scale or ActivationOutliers.scale
        )


@cache
def _raw_presets() -> dict[str, dict]:
    text = resources.files("qwen3_compile.models").joinpath("presets.toml").read_text()
    return tomllib.loads(text)


def _resolve(name: str, raw: dict[str, dict], seen: tuple[str, ...] = ()) -> dict:
    if name in seen:
        raise ValueError(f"presets.toml: inheritance cycle {' -> '.join(seen + (name,))}")
    entry = dict(raw[name])
    parent = entry.pop("inherit", None)
    if parent is None:
        return entry
    merged = _resolve(parent, raw, seen + (name,))
    merged.update(entry)
    return merged


def preset_names() -> list[str]:
    return list(_raw_presets())


def get_preset(name: str, num_layers: int | None = None) -> Preset:
    """The preset called `name`, optionally with `num_layers` decoder layers at full width."""
    raw = _raw_presets()
    if name not in raw:
        raise BadInputError(
            f"'{name}' is neither a preset nor an existing directory.",
            field="MODEL",
            fix=f"use a checkpoint directory or one of: {', '.join(raw)}.",
        )
    entry = _resolve(name, raw)
    unknown = set(entry) - _META_KEYS - _ARCH_FIELDS
    if unknown:
        raise ValueError(f"presets.toml [{name}]: unknown keys {sorted(unknown)}")
    meta = {k: v for k, v in entry.items() if k in _META_KEYS and k != "inherit"}
    if "checkpoint" in entry:
        if num_layers is not None:
            raise BadInputError(
                f"'{name}' is a trained model; --layers applies to random-weight presets only.",
                field="layers",
                fix="drop --layers.",
            )
        folder = resources.files("qwen3_compile.models").joinpath(entry["checkpoint"])
        return Preset(name=name, arch=Qwen3Arch.from_config_file(Path(str(folder)) / "config.json"), **meta)
    arch = Qwen3Arch(**{k: v for k, v in entry.items() if k in _ARCH_FIELDS})
    arch.check(f"presets.toml [{name}]")
    if num_layers is not None:
        arch = arch.with_layers(num_layers)
    return Preset(name=name, arch=arch, **meta)
