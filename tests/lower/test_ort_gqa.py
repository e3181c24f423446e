"""Attention -> ORT GroupQueryAttention: the lowered graph against the canonical one on fresh random inputs
(ORT CPU: prefill, decode steps, a prompt continued after a non-empty past, a right-padded batch), fp16
against the fp32 PyTorch reference, greedy generation on the static-cache runner, the op counts, and the
reasons an attention is declined or a batch refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from qwen3_compile.backends.base import Batch, empty_kv_cache, generate, graph_feeds
from qwen3_compile.backends.onnxruntime.loader import load_ort_runner
from qwen3_compile.backends.onnxruntime.runner import OrtRunner
from qwen3_compile.errors import BadInputError
from qwen3_compile.generation.loop import generate_reply
from qwen3_compile.graph_contract import GQA_MAX_POSITIONS
from qwen3_compile.lower import lower
from qwen3_compile.lower.ort_gqa import COS_CACHE, AttentionToGroupQueryAttention
from qwen3_compile.lower.rules import apply_rules
from qwen3_compile.storage.manifest import read_manifest

from .moe_graphs import settled_positions

RULE = AttentionToGroupQueryAttention.name
MAX_POSITIONS = 64  # the cos/sin tables these tests need (the exports' 4096 would do as well)
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def architecture(artifacts, preset: str) -> dict:
    """The preset's Hugging Face config, as its export records it (no PyTorch model to load)."""
    return json.loads((artifacts.export(preset) / "manifest.json").read_text())["architecture"]


def ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


class GqaGraphs:
    """(canonical path, GQA-lowered path) per preset and dtype, lowered once per module by the GQA rule alone
    (so a comparison sees the attention rewrite and nothing else), with the rewrite report."""

    def __init__(self, artifacts, root: Path):
        self.artifacts, self.root = artifacts, root
        self.made: dict[tuple[str, str], tuple[Path, Path]] = {}
        self.reports: dict[tuple[str, str], object] = {}

    def __call__(self, preset: str, dtype: str = "fp32") -> tuple[Path, Path]:
        if (preset, dtype) not in self.made:
            canonical = self.artifacts.export(preset, dtype) / "model.onnx"
            model = onnx.load(str(canonical))
            self.reports[preset, dtype] = apply_rules(model, [AttentionToGroupQueryAttention(MAX_POSITIONS)])
            out = self.root / f"{preset}-{dtype}"
            out.mkdir()
            onnx.save(model, str(out / "model.onnx"))
            self.made[preset, dtype] = canonical, out / "model.onnx"
        return self.made[preset, dtype]


@pytest.fixture(scope="module")
def graphs(artifacts, tmp_path_factory) -> GqaGraphs:
    return GqaGraphs(artifacts, tmp_path_factory.mktemp("gqa"))


class Sessions:
    """The canonical and the lowered graph on ORT CPU, fed the same inputs."""

    def __init__(self, canonical: Path, lowered: Path, dtype):
        def open_(path):
            return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        self.canonical, self.lowered, self.dtype = open_(canonical), open_(lowered), dtype
        past = next(i for i in self.canonical.get_inputs() if i.name.startswith("past_key_values."))
        self.layers = sum(1 for i in self.canonical.get_inputs() if i.name.endswith(".key"))
        self.heads, self.head_dim = past.shape[1], past.shape[3]

    def empty(self, batch: int) -> list[np.ndarray]:
        return empty_kv_cache(batch, self.layers, self.heads, self.head_dim, self.dtype)

    def both(self, ids, mask, positions, caches) -> tuple[list[np.ndarray], list[np.ndarray]]:
        want = self.canonical.run(None, graph_feeds(ids, mask, positions, caches[0]))
        got = self.lowered.run(None, graph_feeds(ids, mask, positions, caches[1]))
        return want, got


def close(want: np.ndarray, got: np.ndarray) -> bool:
    # fp32 summation order: measured up to 2.3e-5 on logits up to ~60 (2e-7 on presents), the same size as
    # the RMSNorm fusion's; 2e-6 of the largest value holds for both
    return float(np.abs(got - want).max()) <= 2e-6 * float(np.abs(want).max()) + 1e-6


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_fp32_matches_canonical(graphs, preset, artifacts):
    """Prefill of a random batch, decode steps, and a prompt continued after a non-empty past."""
    sessions = Sessions(*graphs(preset), np.float32)
    vocab = architecture(artifacts, preset)["vocab_size"]
    rng = np.random.default_rng()
    ids = rng.integers(0, vocab, (2, 9))
    mask, positions = np.ones_like(ids), np.broadcast_to(np.arange(9), (2, 9)).copy()
    caches = sessions.empty(2), sessions.empty(2)
    for _ in range(4):  # the prefill, then three decode steps of fresh random tokens
        want, got = sessions.both(ids, mask, positions, caches)
        for w, g in zip(want, got, strict=True):  # logits, then every present key/value
            assert w.shape == g.shape and close(w, g)
        caches = want[1:], got[1:]
        ids, positions = rng.integers(0, vocab, (2, 1)), positions[:, -1:] + 1
        mask = np.ones((2, mask.shape[1] + 1), dtype=np.int64)
    # a prompt continued: 6 tokens, then 5 more through the cache (GQA: batch 1 only)
    ids, positions = rng.integers(0, vocab, (1, 11)), np.arange(11)[None]
    first = sessions.both(ids[:, :6], np.ones((1, 6), np.int64), positions[:, :6], (sessions.empty(1),) * 2)
    want, got = sessions.both(
        ids[:, 6:], np.ones((1, 11), np.int64), positions[:, 6:], (first[0][1:], first[1][1:])
    )
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape and close(w, g)


def test_right_padded_batch_matches_canonical(graphs, artifacts):
    """GQA takes each row's length from the mask's row sum: right padding (with ones appended per step, and
    positions counting real tokens) gives the canonical logits at every real position."""
    sessions = Sessions(*graphs("tiny-dense"), np.float32)
    rng = np.random.default_rng()
    ids = rng.integers(0, architecture(artifacts, "tiny-dense")["vocab_size"], (2, 8))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    want, got = sessions.both(ids, mask, positions, (sessions.empty(2), sessions.empty(2)))
    real = mask.astype(bool)
    assert close(want[0][real], got[0][real])
    caches = want[1:], got[1:]
    for _ in range(2):
        token = want[0][:, -1:].argmax(-1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        want, got = sessions.both(token, mask, mask.sum(1, keepdims=True) - 1, caches)
        assert close(want[0], got[0])
        caches = want[1:], got[1:]


@pytest.mark.parametrize("preset", [pytest.param("tiny-dense", marks=pytest.mark.slow), "tiny-moe"])
def test_fp16_no_worse_than_canonical(graphs, artifacts, preset):
    """ORT CPU runs fp16 GQA (its kernel computes in fp32): against the fp32 PyTorch reference, prefill and
    teacher-forced decode steps, the lowered graph errs no more than the canonical fp16 graph, at every
    position whose logits do not hang on a near-tied expert choice (`settled_positions`)."""
    from qwen3_compile.backends.torch_reference import TorchRunner

    canonical, lowered = graphs(preset, "fp16")
    loaded = artifacts.loaded(preset)
    rng = np.random.default_rng()
    for _ in range(20):  # fresh draws until half the positions are settled (measured: 17 of 24 on average)
        ids = rng.integers(0, loaded.model.config.vocab_size, (2, 9))
        batch = Batch(ids, np.ones_like(ids), np.broadcast_to(np.arange(9), (2, 9)).copy())
        ref = generate(TorchRunner(loaded), batch, 4)
        # the whole teacher-forced sequence: step i's logits are those of position 9 + i
        settled = settled_positions(loaded.model, np.concatenate([ids, ref.tokens[:, :-1]], axis=1))
        if settled.sum() >= settled.size // 2:
            break
    assert settled.sum() >= settled.size // 2, settled
    errors = []
    for path in (canonical, lowered):
        run = generate(OrtRunner(path), batch, 4, forced=ref.tokens)
        per_position = [np.abs(ref.prefill_logits - run.prefill_logits).max(-1)]
        per_position += [
            np.abs(a - b).max(-1).reshape(2, -1)[:, -1:]
            for a, b in zip(ref.step_logits, run.step_logits, strict=True)
        ]
        errors.append(np.concatenate(per_position, axis=1)[settled].max())
    base, err = errors
    assert err <= 2 * base + 1e-3, (err, base)


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_attention_lowered(graphs, artifacts, preset, dtype):
    lowered = graphs(preset, dtype)[1]
    report, model = graphs.reports[preset, dtype], onnx.load(str(lowered))
    config = architecture(artifacts, preset)
    layers, head_dim = config["num_hidden_layers"], config["head_dim"]
    assert report.applied[RULE] == layers and RULE not in report.declined
    assert ops(model, "GroupQueryAttention") == layers
    assert ops(model, "Softmax") == ops(model, "Range") == ops(model, "Cos") == 0  # bias and RoPE pruned
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft"
    assert attrs["num_heads"] == config["num_attention_heads"]
    assert attrs["kv_num_heads"] == config["num_key_value_heads"]
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
    assert attrs["scale"] == pytest.approx(head_dim**-0.5, rel=1e-3)  # the graph's constant (fp16 in fp16)
    cos = next(t for t in model.graph.initializer if t.name == COS_CACHE)
    assert list(cos.dims) == [MAX_POSITIONS, head_dim // 2]
    assert cos.data_type == {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16}[dtype]
    assert {p.key: p.value for p in model.metadata_props}[GQA_MAX_POSITIONS] == str(MAX_POSITIONS)
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    onnx.checker.check_model(str(lowered))


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_static_cache_greedy_equals_canonical(graphs, artifacts, preset):
    """Greedy generation on the static-cache runner (one buffer per layer written in place, fixed [B, L]
    mask) makes the canonical graph's tokens: a batch of two, and one prompt prefilled in chunks."""
    canonical, lowered = graphs(preset)
    vocab = architecture(artifacts, preset)["vocab_size"]
    rng = np.random.default_rng()
    ids = rng.integers(0, vocab, (2, 7))
    batch = Batch(ids, np.ones_like(ids), np.broadcast_to(np.arange(7), (2, 7)).copy())
    static = OrtRunner(lowered, static_cache_length=32)
    want, got = generate(OrtRunner(canonical), batch, 16), generate(static, batch, 16)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert close(want.prefill_logits, got.prefill_logits)
    assert all(close(w, g) for w, g in zip(want.step_logits, got.step_logits, strict=True))
    # a second generation of the same batch size reuses the buffers (what keeps a captured CUDA graph valid)
    ids = rng.integers(0, vocab, (2, 7))
    batch = Batch(ids, np.ones_like(ids), batch.position_ids)
    np.testing.assert_array_equal(
        generate(static, batch, 8).tokens, generate(OrtRunner(canonical), batch, 8).tokens
    )
    prompt = rng.integers(0, vocab, 11).tolist()

    def greedy(x):
        return int(x.argmax())

    reply = generate_reply(static, prompt, 12, greedy, stop_ids=(), prefill_chunk=4)
    assert (
        reply.generated_ids
        == generate_reply(OrtRunner(canonical), prompt, 12, greedy, stop_ids=()).generated_ids
    )


def test_static_cache_and_gqa_refusals(graphs):
    canonical, lowered = graphs("tiny-dense")
    with pytest.raises(BadInputError, match="static KV cache needs GroupQueryAttention"):
        OrtRunner(canonical, static_cache_length=32)
    with pytest.raises(BadInputError, match=f"rotary tables cover {MAX_POSITIONS}"):
        OrtRunner(lowered, static_cache_length=MAX_POSITIONS + 1)
    with pytest.raises(BadInputError, match="CUDA graph capture needs the CUDA device"):
        OrtRunner(lowered, static_cache_length=32, enable_cuda_graph=True)
    static, dynamic = OrtRunner(lowered, static_cache_length=8), OrtRunner(lowered)
    left = Batch(
        np.ones((2, 4), np.int64), np.array([[1, 1, 1, 1], [0, 0, 1, 1]]), np.zeros((2, 4), np.int64)
    )
    for runner in (static, dynamic):
        with pytest.raises(BadInputError, match="left padding"):
            generate(runner, left, 2)
        ones, positions = np.ones((2, 5), np.int64), np.arange(5)[None].repeat(2, axis=0)
        _, cache = runner.forward(ones[:, :3], ones[:, :3], positions[:, :3], runner.empty_cache(2))
        with pytest.raises(BadInputError, match="batch 1 only"):  # a prompt continued, batch 2
            runner.forward(ones[:, 3:], ones, positions[:, 3:], cache)
    cache = static.empty_cache(1)
    with pytest.raises(BadInputError, match="holds 8 positions; this step needs 9"):
        static.forward(np.ones((1, 9), np.int64), np.ones((1, 9), np.int64), np.arange(9)[None], cache)


def _damaged(model: onnx.ModelProto, how: str) -> tuple[onnx.ModelProto, str]:
    """Layer 0's attention with one thing changed, and the reason the rule should give."""
    node = {n.name: n for n in model.graph.node}
    if how == "rotate_half":  # Concat(x1, Neg(x2)) instead of Concat(Neg(x2), x1): not RoPE
        concat = node["layers.0/Concat"]
        concat.input[:] = list(reversed(concat.input))
        return model, "not RoPE"
    if how == "read_elsewhere":  # the present key also feeds another node
        model.graph.node.append(
            helper.make_node("Neg", ["layers.0/present_key/out"], ["extra"], name="extra")
        )
        model.graph.output.append(
            helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, ["b", 2, "t", 32])
        )
        return model, "'layers.0/present_key/out' is read outside the attention"
    if how == "softmax_axis":
        softmax = node["layers.0/Softmax"]
        del softmax.attribute[:]
        softmax.attribute.append(helper.make_attribute("axis", 3))
        return model, "not Softmax(.., axis=-1)"
    raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    ["rotate_half", *(pytest.param(h, marks=pytest.mark.slow) for h in ("read_elsewhere", "softmax_axis"))],
)
def test_damaged_attention_is_declined(artifacts, how):
    """A layer whose attention is not the exporter's stays as it is, the report says why (at its Softmax),
    and the graph, half lowered, still computes what it did."""
    canonical = onnx.load(str(artifacts.export("tiny-dense") / "model.onnx"))
    damaged, reason = _damaged(copy.deepcopy(canonical), how)
    expected = copy.deepcopy(damaged)
    report = lower(damaged, "ort-gqa", max_positions=MAX_POSITIONS)
    assert report.applied[RULE] == 1  # layer 1
    (why,) = report.declined[RULE]
    assert why.startswith("layers.0/Softmax: ") and reason in why
    assert ops(damaged, "GroupQueryAttention") == 1 and ops(damaged, "Softmax") == 1
    onnx.checker.check_model(damaged)
    rng = np.random.default_rng()
    ids = rng.integers(0, 1000, (1, 6))
    feeds = graph_feeds(ids, np.ones_like(ids), np.arange(6)[None], empty_kv_cache(1, 2, 2, 32, np.float32))
    open_ = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    want, got = open_(expected).run(["logits"], feeds)[0], open_(damaged).run(["logits"], feeds)[0]
    assert close(want, got)


def test_no_max_positions_is_declined(artifacts):
    model = onnx.load(str(artifacts.export("tiny-dense") / "model.onnx"))
    report = lower(model, "ort-gqa")
    assert RULE not in report.applied and len(report.declined[RULE]) == 2
    assert all("max_positions is not known" in why for why in report.declined[RULE])


def test_lower_cli_attention_gqa(artifacts, tmp_path):
    """`lower --for ort --moe-lowering custom-op --attention gqa`: GQA with ExpertDispatch kept, recorded in
    the manifest; the folder opened with a static cache (ORT CPU runs the ExpertDispatch body) generates the
    canonical graph's tokens; TensorRT refuses the option."""
    from click.testing import CliRunner

    from qwen3_compile.cli import main

    export = artifacts.export("tiny-moe")
    out = tmp_path / "gqa"
    args = ["lower", str(export), "--for", "ort", "--moe-lowering", "custom-op", "--attention", "gqa"]
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["applied"][RULE] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["attention"] == "gqa" and manifest["lowering"]["applied"][RULE] == 2
    lowered = onnx.load(str(out / "model.onnx"))
    assert ops(lowered, "ExpertDispatch") == ops(lowered, "GroupQueryAttention") == 2
    cos = next(t for t in lowered.graph.initializer if t.name == COS_CACHE)
    assert cos.dims[0] == manifest["options"]["max_positions"]  # the export's, passed by the stage
    assert (
        manifest["lowering"]["applied"]["rms_norm_to_simplified_layer_norm"] == 9
    )  # ort-custom-op's rules too
    # the loader's static cache on the lowered folder, against the canonical graph
    static = load_ort_runner(out, read_manifest(out), static_cache_length=16)
    ids = np.random.default_rng().integers(0, 1000, (2, 5))
    batch = Batch(ids, np.ones_like(ids), np.broadcast_to(np.arange(5), (2, 5)).copy())
    want = generate(OrtRunner(export / "model.onnx"), batch, 6).tokens
    np.testing.assert_array_equal(generate(static, batch, 6).tokens, want)
    refused = CliRunner().invoke(
        main,
        [
            "lower",
            str(export),
            "--for",
            "tensorrt",
            "--target",
            "rtx-ada",
            "--attention",
            "gqa",
            "-o",
            str(tmp_path / "x"),
        ],
    )
    assert refused.exit_code == 2 and "--attention" in refused.output
