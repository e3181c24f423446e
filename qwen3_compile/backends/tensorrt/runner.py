"""TensorRT / TensorRT-RTX runner for plans written by `qwen3-compile build`, through Polygraphy's TrtRunner.

The engine has the export's I/O (past/present KV cache) and two optimisation profiles (prefill: a prompt
with no past; decode: one token after the cache). Each call selects the profile that admits its shapes.
Needs a GPU the plan was built for; nothing here runs an engine on the CPU machine (its tests are `gpu`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3_compile.backends.base import empty_kv_cache, graph_feeds
from qwen3_compile.backends.tensorrt.profiles import profile_index, profiles_from_records
from qwen3_compile.backends.tensorrt.shim import import_tensorrt
from qwen3_compile.errors import BadInputError, CheckFailedError
from qwen3_compile.graph_contract import past_names, present_names
from qwen3_compile.kernels.trt_contract import PYTHON_PLUGIN
from qwen3_compile.storage.manifest import MANIFEST, read_manifest
from qwen3_compile.storage.manifests import EngineManifest

PLAN_FILE = "model.plan"


class TensorRTRunner:
    def __init__(self, engine_dir: str | Path, manifest: EngineManifest | None = None):
        engine_dir = Path(engine_dir)
        manifest = manifest or read_manifest(engine_dir)
        if not isinstance(manifest, EngineManifest) or not (engine_dir / PLAN_FILE).is_file():
            raise BadInputError(
                f"a TensorRT runner needs a folder written by `qwen3-compile build`; this is a "
                f"'{manifest.stage}' artifact.",
                file=engine_dir / MANIFEST,
                field="stage",
                fix="run `qwen3-compile build ARTIFACT --target T -o DIR` and pass DIR.",
            )
        self.flavour = manifest.tensorrt.flavour
        trt = import_tensorrt(self.flavour, purpose=f"running {engine_dir}")
        if manifest.moe.plugin == PYTHON_PLUGIN:
            # the engine's Qwen3MoE layers call back into this Python plugin: register it before loading
            from qwen3_compile.kernels.trt_python_plugin import register

            register(trt)
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.name = f"{self.flavour}:{engine_dir.name}"
        self.profiles = profiles_from_records(manifest.profiles)
        self.max_seq = manifest.options.max_seq
        self.num_layers = int(manifest.architecture["num_hidden_layers"])
        _, heads, _, head_dim = self.profiles[0].shapes[past_names(0)[0]][0]
        self.kv_heads, self.head_dim = heads, head_dim
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_dir / PLAN_FILE))))
        try:
            self.runner.activate()
        except Exception as err:  # PolygraphyException: no CUDA device, another SM, another TensorRT
            target, trt = manifest.target, manifest.tensorrt
            raise CheckFailedError(
                f"{self.flavour} could not load the engine ({err}); it was built for {target.name} "
                f"(SM {target.sm}) with {trt.module} {trt.version}.",
                file=engine_dir / PLAN_FILE,
                fix="run it on a GPU of that SM with that TensorRT, or rebuild it for this machine's target.",
            ) from None
        self.kv_dtype = np.dtype(self.runner.get_input_metadata()[past_names(0)[0]].dtype)
        self.active_profile = 0

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return empty_kv_cache(batch, self.num_layers, self.kv_heads, self.head_dim, self.kv_dtype)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        batch, seq = input_ids.shape
        past = cache[0].shape[2]
        if past + seq > self.max_seq:
            raise BadInputError(
                f"{past} cached + {seq} new tokens exceed the engine's {self.max_seq}.",
                field="--max-seq",
                fix="rebuild with a larger --max-seq.",
            )
        index = profile_index(self.profiles, batch, seq, past)
        if index != self.active_profile:
            self.runner.set_profile(index)
            self.active_profile = index
        feeds = graph_feeds(input_ids, attention_mask, position_ids, cache)
        outputs = self.runner.infer(feeds)
        present = [outputs[name] for i in range(self.num_layers) for name in present_names(i)]
        return np.asarray(outputs["logits"], dtype=np.float32), present

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()
