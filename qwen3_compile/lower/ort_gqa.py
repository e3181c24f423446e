"""Attention as the exporter writes it -> one ONNX Runtime `com.microsoft::GroupQueryAttention` node.

The canonical graph spells each layer's attention out (`export/layers.py` `self_attention`):

    q = Transpose(q_normed)            k = Transpose(k_normed)     v = Transpose(Reshape(v_proj))
    q, k = RoPE(q), RoPE(k)            (Split/Neg/Concat/Mul/Add with cos/sin of position_ids)
    present_key = Concat(past_key, k)  present_value = Concat(past_value, v)
    probs = Softmax(Mul(MatMul(Reshape(q), Transpose(Unsqueeze(present_key))), scale) + bias)
    out = Reshape(Transpose(Reshape(MatMul(probs, Unsqueeze(present_value)))))  -> o_proj

where `bias` is the causal + padding bias built once from attention_mask. The rule replaces it with

    GroupQueryAttention(query = Reshape(q_normed, [0, 0, Hq*D]), key = Reshape(k_normed, [0, 0, Hkv*D]),
                        value = v_proj, past_key, past_value, seqlens_k, total_sequence_length,
                        cos_cache, sin_cache; num_heads, kv_num_heads, scale, do_rotary=1,
                        rotary_interleaved=0) -> out, present_key, present_value

with seqlens_k = ReduceSum(attention_mask, 1) - 1 (int32 [B]) and total_sequence_length =
attention_mask.shape[1] (int32 scalar) computed once for all layers, and cos/sin caches [max_positions, D/2]
in the graph's dtype from the graph's `rotary.inv_freq` (angles in fp32, as the canonical graph takes
them). The RoPE of position_ids and the bias become dead and are pruned; position_ids stays a graph input
(the optimum contract) that nothing reads. The model's metadata_props record max_positions under
`qwen3_compile.gqa_max_positions`: how a runner knows a graph is GQA-lowered and how long a static cache
may be.

What GQA computes (ORT 1.31/1.32 source, contrib_ops/{cpu,cuda}/bert/group_query_attention*; checked on
ORT CPU by tests/lower/test_ort_gqa.py). Per row b it takes T_b = seqlens_k[b] + 1 tokens as that row's
length and assumes they sit at cache rows [0, T_b): the valid past is past[:, :, :T_b - S], the S new
keys/values are written at rows [T_b - S, T_b), and query s attends rows [0, T_b - S + s]. Rotary
positions are implicit (T_b - S + s; in the first prompt, S == total_sequence_length, simply s);
position_ids are not read. A call with S > 1 and a non-empty past needs batch 1 (ORT refuses otherwise).
Past and present may be one buffer (the same OrtValue bound as both, pointer-compared): the new rows are
then written in place and its length is the cache capacity, not the past length.

So the lowered graph equals the canonical graph when every row's tokens are contiguous from position 0 and
its positions count them: unpadded batches and right-padded ones (the mask of a right-padded prompt, with
ones appended per decode step; present then holds each row's tokens compacted at the front, not the
canonical layout). It is WRONG for left-padded batches (rows whose mask starts with 0: GQA attends the
padding and writes over real tokens) and for position_ids that do not count the row's tokens. The rule
cannot see the inputs: `OrtRunner` refuses such a batch on a GQA graph (backends/onnxruntime/runner.py).

Not lowered (declined with the reason, reported at the layer's Softmax): a pattern that differs from the
exporter's, a value inside it read elsewhere, head_dim not a multiple of 16 (ORT's rotary needs it), a
non-float cache, or no max_positions (the cos/sin cache size; `lower_artifact` passes the export's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from qwen3_compile.graph_contract import GQA_MAX_POSITIONS
from qwen3_compile.lower.rules import GraphView, Replacement, RewriteRule

GROUP_QUERY_ATTENTION = "GroupQueryAttention"
MS_DOMAIN = "com.microsoft"
SEQLENS_K = "gqa/seqlens_k"
TOTAL_SEQUENCE_LENGTH = "gqa/total_sequence_length"
COS_CACHE, SIN_CACHE = "gqa.cos_cache", "gqa.sin_cache"
INT32 = TensorProto.INT32
_NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class AttentionMatch:
    q_normed: str  # [B, S, Hq, D]
    k_normed: str  # [B, S, Hkv, D]
    value: str  # v_proj's output [B, S, Hkv*D]
    past_key: str
    past_value: str
    present_key: str  # the canonical Concat outputs, produced by GQA after the rewrite
    present_value: str
    concats: tuple[str, str]  # the Concat nodes GQA takes over
    num_heads: int
    kv_num_heads: int
    head_dim: int
    scale: float
    inv_freq: str
    attention_mask: str
    elem_type: int


def _ints(view: GraphView, name: str) -> list[int] | None:
    value = view.constant(name)
    return None if value is None else [int(v) for v in value.reshape(-1)]


def _through_cast(view: GraphView, name: str, to: int | None = None) -> str:
    """`name`, or the input of the Cast that computes it (to `to` when given)."""
    cast = view.producer(name, "Cast")
    if cast is not None and (to is None or view.attrs(cast).get("to") == to):
        return cast.input[0]
    return name


def _is_input(view: GraphView, name: str) -> bool:
    return any(i.name == name for i in view.model.graph.input)


def _rope(view: GraphView, name: str) -> tuple[str, str, str] | str:
    """(x, cos, sin) of the canonical x * cos + rotate_half(x) * sin computing `name`."""
    add = view.producer(name, "Add")
    if add is None:
        return "not RoPE: no Add of x * cos and rotate_half(x) * sin"
    for a, b in (add.input, reversed(add.input)):
        plain, rotated = view.producer(a, "Mul"), view.producer(b, "Mul")
        if plain is None or rotated is None:
            continue
        concat = view.producer(rotated.input[0], "Concat")
        if concat is None or len(concat.input) != 2 or view.attrs(concat).get("axis") != -1:
            continue
        neg = view.producer(concat.input[0], "Neg")
        split = view.producer(neg.input[0], "Split") if neg is not None else None
        if split is None or list(split.output) != [concat.input[1], neg.input[0]]:
            continue
        if view.attrs(split).get("axis") != -1 or split.input[0] != plain.input[0]:
            continue
        return plain.input[0], plain.input[1], rotated.input[1]
    return "not RoPE: no Add(Mul(x, cos), Mul(Concat(Neg(x2), x1), sin)) of one x"


def _cos_sin_source(view: GraphView, cos: str, sin: str) -> tuple[str, str] | str:
    """(inv_freq initializer, position_ids input) of the canonical cos/sin [B, 1, S, D]."""
    angles = []
    for name, op in ((cos, "Cos"), (sin, "Sin")):
        unsqueeze = view.producer(name, "Unsqueeze")
        if unsqueeze is None or _ints(view, unsqueeze.input[1]) != [1]:
            return f"the RoPE {op.lower()} is not Unsqueeze(.., [1]) of the rotary angles"
        trig = view.producer(_through_cast(view, unsqueeze.input[0]), op)
        if trig is None:
            return f"the RoPE {op.lower()} is not a {op} of the rotary angles"
        angles.append(trig.input[0])
    if angles[0] != angles[1]:
        return "cos and sin are not of the same angles"
    concat = view.producer(angles[0], "Concat")
    if concat is None or len(set(concat.input)) != 1 or len(concat.input) != 2:
        return "the angles are not Concat(freqs, freqs)"
    freqs = view.producer(concat.input[0], "Mul")
    if freqs is None:
        return "the angles are not positions * inv_freq"
    inv_freq = next((i for i in freqs.input if i in view.initializers), None)
    positions = next((i for i in freqs.input if i != inv_freq), None)
    if inv_freq is None or positions is None:
        return "inv_freq is not an initializer"
    unsqueeze = view.producer(positions, "Unsqueeze")
    source = _through_cast(view, unsqueeze.input[0], TensorProto.FLOAT) if unsqueeze is not None else ""
    if not _is_input(view, source):
        return "the rotary positions are not the position_ids input"
    return inv_freq, source


def _bias_mask(view: GraphView, bias: str) -> str | None:
    """The attention_mask input the canonical causal + padding bias is built from, else None."""
    unsqueeze = view.producer(bias, "Unsqueeze")
    where = view.producer(unsqueeze.input[0], "Where") if unsqueeze is not None else None
    both = view.producer(where.input[0], "And") if where is not None else None
    if both is None:
        return None
    for a, b in (both.input, reversed(both.input)):
        padding = view.producer(a, "Unsqueeze")
        cast = view.producer(padding.input[0], "Cast") if padding is not None else None
        causal = view.producer(b, "LessOrEqual")
        if cast is not None and causal is not None and _is_input(view, cast.input[0]):
            return cast.input[0]
    return None


class AttentionToGroupQueryAttention(RewriteRule):
    name = "attention_to_group_query_attention"
    # declines are reported at the layer's Softmax (one per attention); the rewrite is anchored at the
    # Reshape that feeds o_proj
    target_op = ("", "Softmax")
    options = ("max_positions",)

    def __init__(self, max_positions: int | None = None) -> None:
        self.max_positions = max_positions
        self._view: GraphView | None = None
        self._readers: dict[str, list[onnx.NodeProto]] = {}
        self._outputs: set[str] = set()
        self._shared_made = False
        self._matched: dict[str, AttentionMatch] = {}  # anchor Reshape -> its match, from check to rewrite

    def _index(self, view: GraphView) -> None:
        if self._view is view:
            return
        self._view, self._shared_made = view, False
        self._readers, self._matched = {}, {}
        for n in view.model.graph.node:
            for i in set(n.input):
                self._readers.setdefault(i, []).append(n)
        self._outputs = {o.name for o in view.model.graph.output}

    def _only_read_by(self, name: str, allowed: onnx.NodeProto) -> bool:
        """`name` is read by `allowed` and otherwise only by Identity nodes that are graph outputs."""
        for reader in self._readers.get(name, []):
            if reader is allowed:
                continue
            if reader.op_type != "Identity" or reader.output[0] not in self._outputs:
                return False
        return True

    def match(self, view: GraphView, node: onnx.NodeProto) -> AttentionMatch | str:
        """The attention whose output `node` (the Reshape feeding o_proj) computes, or why it is not one."""
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            return "not a Reshape"
        self._index(view)
        merge = view.producer(node.input[0], "Transpose")
        if merge is None or view.attrs(merge).get("perm") != [0, 2, 1, 3]:
            return "not Reshape(Transpose(context, [0, 2, 1, 3]))"
        heads = view.producer(merge.input[0], "Reshape")
        heads_shape = _ints(view, heads.input[1]) if heads is not None else None
        if heads_shape is None or len(heads_shape) != 4 or heads_shape[:1] + heads_shape[2:3] != [0, -1]:
            return "the context is not Reshape(.., [0, Hq, -1, D])"
        num_heads, head_dim = heads_shape[1], heads_shape[3]
        if _ints(view, node.input[1]) != [0, 0, num_heads * head_dim]:
            return f"the output is not reshaped to [0, 0, {num_heads * head_dim}]"
        context = view.producer(heads.input[0], "MatMul")
        if context is None:
            return "the context is not MatMul(probs, values)"
        values = view.producer(context.input[1], "Unsqueeze")
        if values is None or _ints(view, values.input[1]) != [2]:
            return "the values are not Unsqueeze(present_value, [2])"
        softmax = view.producer(_through_cast(view, context.input[0]), "Softmax")
        if softmax is None or view.attrs(softmax).get("axis", -1) != -1:
            return "the probabilities are not Softmax(.., axis=-1)"
        biased = view.producer(softmax.input[0], "Add")
        if biased is None:
            return "the Softmax does not read scores + bias"
        sides = [
            (view.producer(_through_cast(view, a, TensorProto.FLOAT), "Mul"), b)
            for a, b in (
                biased.input,
                reversed(biased.input),
            )
        ]
        scaled, bias = next(((m, b) for m, b in sides if m is not None), (None, ""))
        if scaled is None:
            return "the scores are not scaled by a Mul"
        attention_mask = _bias_mask(view, bias)
        if attention_mask is None:
            return "the bias is not the causal + padding bias of attention_mask"
        qk = next((view.producer(i, "MatMul") for i in scaled.input if view.producer(i, "MatMul")), None)
        scale = next((view.constant(i) for i in scaled.input if view.constant(i) is not None), None)
        if qk is None or scale is None or scale.size != 1:
            return "the scores are not MatMul(q, k^T) * a constant scale"
        grouped = view.producer(qk.input[0], "Reshape")
        group_shape = _ints(view, grouped.input[1]) if grouped is not None else None
        if group_shape is None or len(group_shape) != 5 or group_shape[4] != head_dim:
            return "the queries are not Reshape(q, [0, Hkv, g, -1, D])"
        kv_num_heads = group_shape[1]
        if kv_num_heads * group_shape[2] != num_heads:
            return f"{kv_num_heads} kv heads x {group_shape[2]} do not make {num_heads} query heads"
        keys_t = view.producer(qk.input[1], "Transpose")
        keys = view.producer(keys_t.input[0], "Unsqueeze") if keys_t is not None else None
        if (
            keys is None
            or view.attrs(keys_t).get("perm") != [0, 1, 2, 4, 3]
            or _ints(view, keys.input[1]) != [2]
        ):
            return "the keys are not Transpose(Unsqueeze(present_key, [2]), [0, 1, 2, 4, 3])"

        present_key, present_value = keys.input[0], values.input[0]
        cat_k, cat_v = view.producer(present_key, "Concat"), view.producer(present_value, "Concat")
        if cat_k is None or cat_v is None or len(cat_k.input) != 2 or len(cat_v.input) != 2:
            return "present key/value are not Concat(past, new)"
        if not (cat_k.name and cat_v.name):  # the rewrite names the Concats it takes over
            return "the present Concat nodes have no names"
        if view.attrs(cat_k).get("axis") != 2 or view.attrs(cat_v).get("axis") != 2:
            return "present key/value are not concatenated on the sequence axis (2)"
        past_key, k_rot = cat_k.input
        past_value, v_t = cat_v.input
        if not (_is_input(view, past_key) and _is_input(view, past_value)):
            return "the past key/value are not graph inputs"
        for value, reader in ((present_key, keys), (present_value, values)):
            if not self._only_read_by(value, reader):
                return f"'{value}' is read outside the attention"

        q = _rope(view, grouped.input[0])
        k = _rope(view, k_rot)
        if isinstance(q, str) or isinstance(k, str):
            return q if isinstance(q, str) else k
        if q[1:] != k[1:]:
            return "q and k are not rotated by the same cos/sin"
        normed = []
        for x in (q[0], k[0]):
            transpose = view.producer(x, "Transpose")
            if transpose is None or view.attrs(transpose).get("perm") != [0, 2, 1, 3]:
                return "the rotated q/k are not Transpose(normed, [0, 2, 1, 3])"
            normed.append(transpose.input[0])
        v_heads = view.producer(v_t, "Transpose")
        v_split = view.producer(v_heads.input[0], "Reshape") if v_heads is not None else None
        if v_split is None or _ints(view, v_split.input[1]) != [0, 0, kv_num_heads, head_dim]:
            return f"the new values are not Transpose(Reshape(v_proj, [0, 0, {kv_num_heads}, {head_dim}]))"
        source = _cos_sin_source(view, q[1], q[2])
        if isinstance(source, str):
            return source
        inv_freq, _positions = source
        if list(view.initializers[inv_freq].dims) != [head_dim // 2]:
            return f"inv_freq '{inv_freq}' is not [{head_dim // 2}]"

        elem_type = next(
            (i.type.tensor_type.elem_type for i in view.model.graph.input if i.name == past_key), None
        )
        if elem_type not in _NUMPY and elem_type != TensorProto.BFLOAT16:
            return "the KV cache is not fp32, fp16 or bf16"
        if head_dim % 16:
            return f"head_dim {head_dim} is not a multiple of 16 (ORT's GQA rotary needs it)"
        if self.max_positions is None:
            return "max_positions is not known (the cos/sin cache size; `lower` passes the export's)"
        return AttentionMatch(
            q_normed=normed[0],
            k_normed=normed[1],
            value=v_split.input[0],
            past_key=past_key,
            past_value=past_value,
            present_key=present_key,
            present_value=present_value,
            concats=(cat_k.name, cat_v.name),
            num_heads=num_heads,
            kv_num_heads=kv_num_heads,
            head_dim=head_dim,
            scale=float(scale.reshape(())),
            inv_freq=inv_freq,
            attention_mask=attention_mask,
            elem_type=elem_type,
        )

    def _anchor(self, view: GraphView, softmax: onnx.NodeProto) -> onnx.NodeProto | str:
        """Forward from a Softmax (through a Cast back to the graph's dtype) to the Reshape feeding o_proj."""
        self._index(view)
        node = softmax
        for expected in ("Cast|MatMul", "MatMul", "Reshape", "Transpose", "Reshape"):
            if expected == "MatMul" and node.op_type == "MatMul":
                continue  # no Cast: the fp32 graph
            readers = self._readers.get(node.output[0], [])
            if len(readers) != 1:
                return f"'{node.output[0]}' is read by {len(readers)} nodes, not only the attention"
            node = readers[0]
            if node.op_type not in expected.split("|"):
                return f"not the exporter's attention: {node.op_type} '{node.name}' where {expected} belongs"
        return node

    def check(self, view: GraphView, node: onnx.NodeProto) -> str | None:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            anchor = self._anchor(view, node)
            if isinstance(anchor, str):
                return anchor
            found = self.match(view, anchor)
            return found if isinstance(found, str) else f"lowered at '{anchor.name}'"
        if node.op_type != "Reshape":
            return "not a Reshape"
        found = self.match(view, node)
        if isinstance(found, str):
            return found
        self._matched[node.name] = found
        return None

    def _shared(self, view: GraphView, found: AttentionMatch) -> tuple[list[onnx.NodeProto], dict]:
        """seqlens_k, total_sequence_length and the cos/sin caches: made once per graph."""
        if self._shared_made:
            return [], {}
        self._shared_made = True
        mask = found.attention_mask
        nodes = [
            helper.make_node("Cast", [mask], ["gqa/mask_int32"], name="gqa/mask_int32", to=INT32),
            helper.make_node(
                "ReduceSum", ["gqa/mask_int32", "gqa/axis_1"], ["gqa/lengths"], name="gqa/lengths", keepdims=0
            ),
            helper.make_node("Sub", ["gqa/lengths", "gqa/one_int32"], [SEQLENS_K], name=SEQLENS_K),
            helper.make_node("Shape", [mask], ["gqa/mask_width"], name="gqa/mask_width", start=1, end=2),
            helper.make_node("Squeeze", ["gqa/mask_width"], ["gqa/mask_width_scalar"], name="gqa/width"),
            helper.make_node(
                "Cast",
                ["gqa/mask_width_scalar"],
                [TOTAL_SEQUENCE_LENGTH],
                name=TOTAL_SEQUENCE_LENGTH,
                to=INT32,
            ),
        ]
        inv_freq = np.asarray(view.array(found.inv_freq), dtype=np.float32)
        # fp32 angles, as the canonical graph computes them
        angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
        dtype = _NUMPY.get(found.elem_type)
        if dtype is None:
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        arrays = {
            "gqa/axis_1": np.array([1], dtype=np.int64),
            "gqa/one_int32": np.array(1, dtype=np.int32),
            COS_CACHE: np.cos(angles).astype(dtype),
            SIN_CACHE: np.sin(angles).astype(dtype),
        }
        return nodes, arrays

    def rewrite(self, view: GraphView, node: onnx.NodeProto) -> Replacement:
        found = self._matched.pop(node.name)  # check matched it just before
        nodes, arrays = self._shared(view, found)
        flat = []
        for name, heads in ((found.q_normed, found.num_heads), (found.k_normed, found.kv_num_heads)):
            shape = f"gqa/shape_0_0_{heads * found.head_dim}"
            if shape not in view.initializers and shape not in arrays:
                arrays[shape] = np.array([0, 0, heads * found.head_dim], dtype=np.int64)
            flat.append(f"{name}/flat")
            nodes.append(helper.make_node("Reshape", [name, shape], [flat[-1]], name=f"{name}/flat"))
        nodes.append(
            helper.make_node(
                GROUP_QUERY_ATTENTION,
                [*flat, found.value, found.past_key, found.past_value, SEQLENS_K, TOTAL_SEQUENCE_LENGTH]
                + [COS_CACHE, SIN_CACHE],
                [node.output[0], found.present_key, found.present_value],
                name=f"{node.name}/{GROUP_QUERY_ATTENTION}",
                domain=MS_DOMAIN,
                num_heads=found.num_heads,
                kv_num_heads=found.kv_num_heads,
                scale=found.scale,
                do_rotary=1,
                rotary_interleaved=0,
            )
        )
        metadata = {GQA_MAX_POSITIONS: str(self.max_positions)}
        return Replacement(nodes, arrays, {MS_DOMAIN: 1}, supersedes=found.concats, metadata=metadata)
