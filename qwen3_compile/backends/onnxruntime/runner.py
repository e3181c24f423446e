"""ONNX Runtime runner for exported graphs (past/present KV cache, optimum-style I/O), on the CPU or CUDA.

Two ways to feed the session:
- plain `session.run` (the CPU default): numpy in, numpy out; the KV cache is a list of numpy arrays.
- IO binding (always on CUDA; optional on the CPU, where the tests exercise it): the KV cache is a list of
  OrtValues that stay where ORT wrote them (GPU memory on CUDA) and are bound as the next step's past, so no
  cache byte crosses to the host. Per step only the ids, mask and positions go in (a few int64s at decode)
  and the logits come out (bound to host memory: the caller picks the next token from them).
- a static KV cache (`static_cache_length`, graphs lowered with `--attention gqa` only): IO binding with one
  buffer per layer bound as past and present, written in place by GroupQueryAttention, and a fixed-width
  mask, so decode steps have identical shapes; on CUDA `enable_cuda_graph` then replays decode steps from
  a captured CUDA graph (static_cache.py says what was checked where).
GQA graphs (either cache) refuse left-padded batches, which GroupQueryAttention computes differently from
the canonical graph (lower/ort_gqa.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3_compile.backends.base import empty_kv_cache, graph_feeds
from qwen3_compile.backends.onnxruntime.op_libraries import custom_op_libraries
from qwen3_compile.backends.onnxruntime.settings import ONNX_TYPES, empty_past, open_session, session_options
from qwen3_compile.backends.onnxruntime.static_cache import (
    CapturedDecode,
    StaticCache,
    check_gqa_batch,
    gqa_cache_limit,
    not_captured,
    static_mask,
)
from qwen3_compile.errors import BadInputError
from qwen3_compile.graph_contract import LOGITS_NAN, NEXT_TOKEN, past_names, present_names

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_IDS = ("input_ids", "attention_mask", "position_ids")
GREEDY_OUTPUTS = (NEXT_TOKEN, LOGITS_NAN)


class OrtRunner:
    def __init__(
        self,
        model_path: str | Path,
        optimization: str = "all",
        threads: int | None = None,
        providers: list | None = None,
        session_config: dict[str, str] | None = None,
        device: str = "cpu",
        io_binding: bool | None = None,
        cuda_options: dict[str, str] | None = None,
        custom_ops: list | tuple | None = None,
        static_cache_length: int | None = None,
        enable_cuda_graph: bool = False,
    ):
        """`optimization` and `session_config`: what the artifact's manifest records (settings.py).
        `device`: "cpu" or "cuda" (settings.execution_providers; `providers` overrides it). `io_binding`:
        keep the KV cache in the session's device memory between calls (default: on for CUDA).
        `custom_ops`: ORT custom-op libraries for a CUDA session (default: $QWEN3_COMPILE_ORT_OPS;
        op_libraries.py). `static_cache_length`: a static KV cache of that many positions (GQA graphs only;
        static_cache.py). `enable_cuda_graph`: on CUDA with a static cache, capture decode steps in a CUDA
        graph and replay them (measured on the GPU only)."""

        if enable_cuda_graph and (device != "cuda" or static_cache_length is None):
            raise BadInputError(
                "CUDA graph capture needs the CUDA device and a static KV cache (fixed shapes, addresses).",
                field="enable_cuda_graph",
                fix="open the runner with device='cuda' and static_cache_length=N, or leave it off.",
            )
        self.static_cache_length, self.enable_cuda_graph = static_cache_length, enable_cuda_graph
        self._captured: CapturedDecode | None = None
        self._static: dict[int, list] = {}  # batch -> the static cache's buffers (one live cache per batch)
        if enable_cuda_graph:
            cuda_options = (cuda_options or {}) | {"enable_cuda_graph": "1"}
        options = session_options(optimization, session_config, threads)
        self.custom_ops = custom_op_libraries(device, custom_ops)
        self.device = device
        self.session = open_session(
            str(model_path), options, model_path, device, providers, cuda_options, self.custom_ops
        )
        self.gqa_limit = gqa_cache_limit(self.session)
        self._check_static(model_path, static_cache_length)
        self.name = f"onnxruntime{'-cuda' if device == 'cuda' else ''}:{Path(model_path).parent.name}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        past = inputs[past_names(0)[0]]
        self.kv_heads, self.head_dim = past.shape[1], past.shape[3]
        self.kv_type = past.type
        self.kv_dtype = _NUMPY_TYPES.get(past.type)  # None for bf16 (numpy has none): IO binding only
        self.past = [n for i in range(self.num_layers) for n in past_names(i)]
        self.present = [n for i in range(self.num_layers) for n in present_names(i)]
        self.outputs = ["logits"] + self.present
        # a deployment graph (`lower --logits last`) returns the last position's logits only, and the greedy
        # token picked on the device (lower/greedy_token.py: forward_greedy)
        self.last_logits = self.session.get_outputs()[0].shape[1] == 1
        self.greedy = set(GREEDY_OUTPUTS) <= {o.name for o in self.session.get_outputs()}
        self.io_binding = device != "cpu" if io_binding is None else io_binding
        self.io_binding = self.io_binding or static_cache_length is not None
        if not self.io_binding and self.kv_dtype is None:
            raise ValueError(f"a {past.type} KV cache needs io_binding=True (numpy has no such dtype)")

    def _check_static(self, model_path, length: int | None) -> None:
        if length is not None and self.gqa_limit is None:
            raise BadInputError(
                "a static KV cache needs GroupQueryAttention (it writes the cache in place); this graph has "
                "none.",
                file=model_path,
                field="static_cache_length",
                fix="lower the export with `qwen3-compile lower --for ort --attention gqa`, or leave the "
                "static cache off.",
            )
        if length is not None and not 0 < length <= self.gqa_limit:
            raise BadInputError(
                f"a static KV cache of {length} positions: the graph's rotary tables cover {self.gqa_limit}.",
                file=model_path,
                field="static_cache_length",
                fix=f"use 1 to {self.gqa_limit} (the export's --max-positions).",
            )

    @property
    def provider_options(self) -> dict[str, dict[str, str]]:
        """What the session runs with, as ORT reports it (the validation report records it)."""
        return self.session.get_provider_options()

    def empty_cache(self, batch: int) -> list | StaticCache:
        if self.static_cache_length is not None:  # the batch's buffers, reused: a captured graph keeps them
            if batch not in self._static:
                self._static[batch] = self._static_buffers(batch)
            return StaticCache(self._static[batch], batch, self.static_cache_length)
        if not self.io_binding:
            return empty_kv_cache(batch, self.num_layers, self.kv_heads, self.head_dim, self.kv_dtype)
        return [empty_past(batch, self.kv_heads, self.head_dim, self.kv_type)] * (2 * self.num_layers)

    def _static_buffers(self, batch: int) -> list:
        import onnxruntime as ort

        shape = [batch, self.kv_heads, self.static_cache_length, self.head_dim]
        if self.kv_dtype is None:  # bf16: not zero-filled (rows past a row's length are never read)
            make = ort.OrtValue.ortvalue_from_shape_and_type
            return [make(shape, ONNX_TYPES[self.kv_type], self.device, 0) for _ in self.past]
        # one array each: on the CPU an OrtValue wraps the array's memory, it does not copy it
        return [
            ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype), self.device, 0)
            for _ in self.past
        ]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: list | StaticCache,
    ) -> tuple[np.ndarray, list | StaticCache]:
        (logits,), cache = self._forward(input_ids, attention_mask, position_ids, cache, ("logits",))
        return logits, cache

    def forward_greedy(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: list | StaticCache,
    ) -> tuple[np.ndarray, np.ndarray, list | StaticCache]:
        """(greedy next token [B], whether the row's logits hold a NaN [B], cache), for graphs lowered with
        --logits last: the token is picked on the device, and only these few bytes come to the host (the
        logits stay where ORT wrote them)."""
        if not self.greedy:
            raise ValueError("forward_greedy needs a graph lowered with --logits last (next_token output)")
        (tokens, nan), cache = self._forward(input_ids, attention_mask, position_ids, cache, GREEDY_OUTPUTS)
        return tokens[:, 0], nan[:, 0], cache

    def _forward(self, input_ids, attention_mask, position_ids, cache, wanted: tuple[str, ...]):
        """(the `wanted` outputs as host arrays, the next cache)."""
        if self.last_logits and input_ids.shape[1] > 1 and (attention_mask[:, -1] == 0).any():
            raise BadInputError(
                "this graph returns the last position's logits only (--logits last), and a row of this batch "
                "ends with padding (right padding): its last position is not its newest token.",
                field="attention_mask",
                fix="run one sequence at a time, pad on the left (standard attention), or use --logits all.",
            )
        if isinstance(cache, StaticCache):
            return self._forward_static(input_ids, attention_mask, position_ids, cache, wanted)
        if self.gqa_limit is not None:
            past = cache[0].shape[2] if isinstance(cache[0], np.ndarray) else cache[0].shape()[2]
            check_gqa_batch(attention_mask, input_ids.shape[1], past)
        if self.io_binding:
            return self._forward_bound(input_ids, attention_mask, position_ids, cache, wanted)
        feeds = graph_feeds(input_ids, attention_mask, position_ids, cache)
        out = self.session.run([*wanted, *self.present], feeds)
        return out[: len(wanted)], out[len(wanted) :]

    def _forward_bound(self, input_ids, attention_mask, position_ids, cache, wanted) -> tuple[list, list]:
        """One call through IO binding: the past OrtValues are bound where they live, the presents are
        allocated by ORT on the device and returned as the next cache, the wanted outputs are bound to the
        host (any other output stays on the device)."""
        binding = self.session.io_binding()
        host = [np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids)]
        for name, array in zip(_IDS, host, strict=True):
            binding.bind_cpu_input(name, array)  # copied to the device by ORT (a few bytes at decode)
        for name, value in zip(self.past, cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in wanted:
            binding.bind_output(name, "cpu")
        for name in self.present:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return [v.numpy() for v in outputs[: len(wanted)]], outputs[len(wanted) :]

    def _forward_static(self, input_ids, attention_mask, position_ids, cache: StaticCache, wanted):
        """One call on the static cache: its buffers bound as past AND present (GQA writes in place)."""
        check_gqa_batch(attention_mask, input_ids.shape[1], cache.length)
        mask = static_mask(attention_mask, cache)
        extended = StaticCache(cache.buffers, cache.batch, cache.capacity, attention_mask.shape[1])
        if self.enable_cuda_graph and cache.length and input_ids.shape[1] == 1:
            if self._captured is None:
                self._captured = CapturedDecode(self.session, cache, _IDS, self.past, self.present)
            elif self._captured.cache.buffers is not cache.buffers:
                raise BadInputError(
                    f"this runner captured its CUDA graph for batch {self._captured.cache.batch}; this "
                    f"step has batch {cache.batch}.",
                    field="enable_cuda_graph",
                    fix="open one runner per batch size (a captured graph replays fixed shapes, addresses).",
                )
            return self._captured.step(input_ids, mask, position_ids, wanted), extended
        binding = self.session.io_binding()
        for name in wanted:  # first: get_outputs() lists outputs in binding order
            binding.bind_output(name, "cpu")
        for name, array in zip(_IDS, (input_ids, mask, position_ids), strict=True):
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        for past, present, value in zip(self.past, self.present, cache.buffers, strict=True):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding, not_captured() if self.enable_cuda_graph else None)
        return [v.numpy() for v in binding.get_outputs()[: len(wanted)]], extended
