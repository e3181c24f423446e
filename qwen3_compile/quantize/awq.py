"""AWQ (activation-aware weight quantization) for INT4 weight groups, searched during calibration.

Per input channel j of a group of projections reading one activation X: s_j = mean|X_j|^alpha, normalised
to a geometric mean of 1 between its extremes; alpha is searched over `grid` values i / grid (i = 0..grid-1;
alpha 0 is round-to-nearest) for the least squared output error on the calibration activations. As in AWQ's
reference code (`module2inspect`), the error is taken at the output of the block the projections feed: q/k/v
at the attention's output (o_proj float), gate/up at the MLP's (down_proj float; MoE: the sparse block with
its router); o_proj and down_proj, which feed the residual, at their own output,
sum_p || X W_p^T - (X / s) Q(W_p * s)^T ||^2. Summing each projection's own output error instead would count
an error in q or k (which the q/k norms and softmax shrink or amplify) like one in v, and one in gate like
one in up. The projections get W * s, and 1 / s is folded into what produces X, so the float model computes
the same function (exactly, up to rounding):

- input_layernorm -> q/k/v_proj (one s for the three); post_attention_layernorm -> gate/up_proj, or every
  expert's gate_up_proj plus the float router, which reads the same X (one s for all experts);
- o_proj's input is the attention context, linear in v: v_proj's output rows / s. Under GQA a v row feeds
  every query head of its group, so s is tied over those heads (searched per kv head and dimension);
- down_proj's input is silu(gate) * up, linear in up: up_proj's output rows / s (per expert for MoE, over
  the tokens routed to it). q_proj/k_proj outputs go through the per-head q/k RMSNorm, which undoes output
  scaling, so nothing is folded into them.

Searched in the order the folds need: o (fold into v) before q/k/v, down (fold into up) before gate/up, so
each search sees the weights as they will be quantized.

Then AWQ's clipping search (`clip_grid` > 0): per output channel and input group of v/o and the dense MLP,
the largest |w| shrunk by a ratio r (1 down to 0.5) before quantizing, r chosen for the least output error on
the same activations, sum_n (X_g (W_g - Q(clip_r W_g))^T)^2; r = 1 is round-to-nearest, so no group gets
worse on the calibration set. Clipping is a weight transform like the scales (the quantizer then takes
max|w| of the clipped group), recorded as `clip/<weight>` [out, groups]. Not q/k (AWQ skips them too: their
output error is not what reaches the attention's output) nor MoE experts (E times as many ratios).

The transforms that apply the scales, folds and ratios to the weights are in awq_fold.py. Search variants
measured against this one on the trained models (benchmarks/awq_variants.py) subclass `AwqSearch`: its
`_search` is the one place a scale vector is chosen, and `__call__` returns whether it replaced the layer's
weights (calibrate then feeds the next layer that layer's output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.quantize.weights import INT4_MAX

MIN_SCALE = 1e-4


def fake_int4(w, group: int, scale_dtype=None):
    """Symmetric INT4 per group along the last (input) axis, dequantized: int4.py's convention in torch.
    `scale_dtype`: the scales rounded to it first, as an fp16 graph stores them."""
    import torch

    g = w.reshape(*w.shape[:-1], w.shape[-1] // group, group)
    scale = g.abs().amax(dim=-1, keepdim=True) / INT4_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).to(w.dtype)
    return (torch.round(g / scale).clamp(-INT4_MAX, INT4_MAX) * scale).reshape(w.shape)


def _rows(samples: list, limit: int, seed: int):
    """The kept activation rows, at most `limit` of them (a fixed random subset)."""
    import torch

    x = torch.cat(samples)
    if len(x) > limit:
        x = x[torch.from_numpy(np.random.default_rng(seed).choice(len(x), limit, replace=False))]
    return x.double()


@dataclass
class Problem:
    """One search over projections [out, in] (torch layout), each with the activation rows it reads; the loss
    is their summed output error (AWQ for a projection alone: o_proj, down_proj)."""

    parts: list[tuple[object, object]]  # (X [N, in], W [out, in]) pairs
    tie: Callable | None = None  # maps a free scale vector to the per-input-channel one (GQA ties)

    def mean_abs(self):
        total = sum(len(x) for x, _ in self.parts)
        return sum(x.abs().sum(dim=0) for x, _ in self.parts) / max(total, 1)

    def loss(self, s, group: int, quantize=fake_int4):
        """The summed squared output error (a 0-d tensor); `quantize(w, group)` fake-quantizes."""
        total = 0.0
        for x, w in self.parts:
            want = x @ w.T
            got = (x / s) @ quantize(w * s, group).T
            total = total + (want - got).square().sum()
        return total


@dataclass
class BlockProblem:
    """One search whose loss is the output error of the module the scaled projections feed (AWQ's
    `module2inspect`): the attention (q/k/v quantized, o_proj float) or the MLP (gate/up quantized, down_proj
    float; for MoE the whole sparse block, router included). Errors count by what they do to the block's
    output, through the q/k norms, softmax and SwiGLU, not each projection's output alike."""

    module: object  # torch module, called with `params` through torch.func.functional_call
    params: dict[str, object]  # every parameter of `module`, float64, with the folds searched before applied
    scaled: tuple[str, ...]  # the parameters (input axis last) quantized with s
    inputs: list  # per calibration sequence [1, T, in], float64
    kwargs: Callable[[object], dict] = lambda x: {}  # a sequence's other forward arguments (RoPE, mask)
    tie: Callable | None = None
    _want: list | None = None

    def _run(self, params) -> list:
        from torch.func import functional_call

        outs = []
        for x in self.inputs:
            out = functional_call(self.module, params, (x,), self.kwargs(x))
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def mean_abs(self):
        rows = [x.reshape(-1, x.shape[-1]) for x in self.inputs]
        return sum(r.abs().sum(dim=0) for r in rows) / max(sum(len(r) for r in rows), 1)

    def loss(self, s, group: int, quantize=fake_int4):
        """The module's summed squared output error (a 0-d tensor)."""
        if self._want is None:
            self._want = self._run(self.params)
        # (X / s) Q(W s)^T = X (Q(W s) / s)^T: the module reads its input as it is
        params = self.params | {n: quantize(self.params[n] * s, group) / s for n in self.scaled}
        return sum((w - g).square().sum() for w, g in zip(self._want, self._run(params), strict=True))


def _sequences(samples: list, limit: int, seed: int) -> list:
    """Whole calibration sequences [1, T, in] (attention needs them whole): a fixed random subset of at most
    `limit` tokens, at least one sequence."""
    kept, tokens = [], 0
    for i in np.random.default_rng(seed).permutation(len(samples)).tolist():
        if kept and tokens + len(samples[i]) > limit:
            continue
        kept.append(samples[i].double()[None])
        tokens += len(samples[i])
    return kept


def search(problem: Problem | BlockProblem, grid: int, group: int) -> tuple[np.ndarray, dict]:
    """The best scales (per input channel, or per tied channel) and a summary for the manifest."""
    import torch

    mean_abs = problem.mean_abs()
    if problem.tie is not None:
        mean_abs = problem.tie.reduce(mean_abs)
    best, best_alpha, losses = None, 0.0, []
    for i in range(grid):
        alpha = i / grid
        free = mean_abs.clamp(min=MIN_SCALE).pow(alpha)
        free = free / (free.max() * free.min()).sqrt()
        s = problem.tie.expand(free) if problem.tie is not None else free
        losses.append(float(problem.loss(s, group)))
        if best is None or losses[-1] < losses[best]:
            best, best_alpha, best_free = len(losses) - 1, alpha, free
    assert torch.isfinite(best_free).all()
    return best_free.numpy(), {"alpha": best_alpha, "loss": losses[best], "rtn_loss": losses[0]}


@dataclass(frozen=True)
class HeadTie:
    """o_proj input channels (head, dim) share the scale of their kv head's (group, dim)."""

    heads: int
    kv_heads: int
    head_dim: int

    def reduce(self, per_channel):
        per_head = per_channel.reshape(self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        return per_head.mean(dim=1).reshape(-1)

    def expand(self, per_kv):
        rep = self.heads // self.kv_heads
        return per_kv.reshape(self.kv_heads, 1, self.head_dim).expand(-1, rep, -1).reshape(-1)


@dataclass
class AwqSearch:
    """`calibrate`'s per-layer callback: searches the layer's scales on its activation samples; `scales`
    then holds them by what they scale (`<layer>.attn` / `o` / `mlp` / `down`, MoE `down/<e>`)."""

    arch: Qwen3Arch
    grid: int
    group: int
    max_tokens: int
    clip_grid: int = 0
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, dict] = field(default_factory=dict)
    _rotary: object = None

    def _keep(self, key: str, s: np.ndarray, info: dict):
        import torch

        self.scales[key], self.summary[key] = s, info
        return torch.from_numpy(s)

    def _attention_kwargs(self, x) -> dict:
        """RoPE and the causal mask for a sequence [1, T, H], as `calibrate` runs the layer."""
        import torch
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        if self._rotary is None:
            self._rotary = Qwen3RotaryEmbedding(config=self.arch.to_transformers_config())
        length = x.shape[1]
        mask = torch.full((length, length), torch.finfo(torch.float32).min, dtype=x.dtype).triu(1)
        cos_sin = self._rotary(x, torch.arange(length)[None])
        return {"position_embeddings": cos_sin, "attention_mask": mask[None, None]}

    def _search(self, problem: Problem | BlockProblem) -> tuple[np.ndarray, dict]:
        return search(problem, self.grid, self.group)

    def __call__(self, index: int, layer, stats) -> bool:
        p, a = f"model.layers.{index}.", self.arch
        attn, mlp = layer.self_attn, layer.mlp
        rows = partial(_rows, limit=self.max_tokens, seed=index)
        sequences = partial(_sequences, limit=self.max_tokens, seed=index)
        w = {n: getattr(attn, f"{n}_proj").weight.double() for n in "qkvo"}
        tie = HeadTie(a.num_heads, a.num_kv_heads, a.head_dim)
        o_in = rows(stats.samples["o_in"])
        s_o = self._keep(p + "o", *self._search(Problem([(o_in, w["o"])], tie)))
        w["v"] = w["v"] / s_o[:, None]  # the fold: v's output rows / s
        params = {n: t.detach().double() for n, t in attn.named_parameters()}
        params |= {"v_proj.weight": w["v"], "o_proj.weight": w["o"] * tie.expand(s_o)}
        problem = BlockProblem(
            attn,
            params,
            ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
            sequences(stats.samples["attn_in"]),
            self._attention_kwargs,
        )
        s_attn = self._keep(p + "attn", *self._search(problem))
        x = rows(stats.samples["attn_in"])
        # (projection, its input rows, its input-channel scale s, its weight before s): clipping searches
        # W * s on X / s, what the quantizer sees. Not q/k: their error reaches the output through the
        # q/k norms and softmax, which a per-output-channel error does not measure (AWQ skips them too)
        clip = [("self_attn.v_proj", x, s_attn, w["v"]), ("self_attn.o_proj", o_in, tie.expand(s_o), w["o"])]
        params = {n: t.detach().double() for n, t in mlp.named_parameters()}
        if a.is_moe:
            gate_up, down = params["experts.gate_up_proj"].clone(), params["experts.down_proj"].clone()
            inter = gate_up.shape[1] // 2  # gate_up [E, 2I, H], down [E, H, I]
            for e in range(gate_up.shape[0]):
                if f"expert_mid/{e}" not in stats.samples:  # no token: nothing to weigh, s = 1
                    continue
                problem = Problem([(rows(stats.samples[f"expert_mid/{e}"]), down[e])])
                s_down = self._keep(f"{p}down/{e}", *self._search(problem))
                gate_up[e, inter:] /= s_down[:, None]
                down[e] *= s_down
            params |= {"experts.gate_up_proj": gate_up, "experts.down_proj": down}
            scaled = ("experts.gate_up_proj",)
        else:
            down_in = rows(stats.samples["down_in"])
            problem = Problem([(down_in, params["down_proj.weight"])])
            s_down = self._keep(p + "down", *self._search(problem))
            gate, up, down = (params[f"{n}_proj.weight"] for n in ("gate", "up", "down"))
            params |= {"up_proj.weight": up / s_down[:, None], "down_proj.weight": down * s_down}
            scaled = ("gate_proj.weight", "up_proj.weight")
        problem = BlockProblem(mlp, params, scaled, sequences(stats.samples["mlp_in"]))
        s_mlp = self._keep(p + "mlp", *self._search(problem))
        if not a.is_moe:
            x = rows(stats.samples["mlp_in"])
            clip += [
                ("mlp.gate_proj", x, s_mlp, gate),
                ("mlp.up_proj", x, s_mlp, params["up_proj.weight"]),
                ("mlp.down_proj", down_in, s_down, down),
            ]
        for name, x_in, s, weight in clip if self.clip_grid else ():
            self.scales[f"{p}clip/{name}"] = search_clip(x_in / s, weight * s, self.group, self.clip_grid)
        return False  # the layer's weights are left as they are (calibrate's sequential protocol)

    def manifest_summary(self) -> dict:
        """Alpha per group (experts' down: the mean), and the search loss against round-to-nearest."""
        alphas = {k: v["alpha"] for k, v in self.summary.items() if "/" not in k}
        # per group, the searched loss over round-to-nearest's: where AWQ gained (outlier-reading blocks)
        ratios = {
            k: v["loss"] / v["rtn_loss"] if v["rtn_loss"] > 0 else 1.0
            for k, v in self.summary.items()
            if "/" not in k
        }
        experts = [v["alpha"] for k, v in self.summary.items() if "/" in k]
        loss = sum(v["loss"] for v in self.summary.values())
        rtn = sum(v["rtn_loss"] for v in self.summary.values())
        return {
            "grid": self.grid,
            "alpha": alphas,
            **({"experts_down_mean_alpha": float(np.mean(experts))} if experts else {}),
            "calibration_mse_vs_rtn": loss / rtn if rtn > 0 else 1.0,
            "mse_vs_rtn": ratios,
        }


def clip_ratios(clip_grid: int) -> list[float]:
    return [1.0 - 0.5 * i / clip_grid for i in range(clip_grid)]


def search_clip(x, w, group: int, clip_grid: int, chunk: int = 256) -> np.ndarray:
    """Per output channel and input group of `w` [out, in] (float64 torch), the clip ratio with the least
    output error on `x` [N, in]: ratios [out, in / group]. Tokens are summed `chunk` rows at a time (the
    per-token error of every row and group would be N x out x groups values)."""
    import torch

    out, width = w.shape
    wg = w.reshape(out, width // group, group)
    amax = wg.abs().amax(dim=-1, keepdim=True)
    best_err = best = None
    for r in clip_ratios(clip_grid):
        clipped = torch.maximum(torch.minimum(wg, r * amax), -r * amax)
        diff = wg - fake_int4(clipped.reshape(out, width), group).reshape(wg.shape)
        err = torch.zeros(out, width // group, dtype=w.dtype)
        for start in range(0, len(x), chunk):
            xg = x[start : start + chunk].reshape(-1, width // group, group)
            err += torch.einsum("ngk,rgk->ngr", xg, diff).square().sum(dim=0).T
        if best is None:
            best_err, best = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(err, r), best)
    return best.numpy()
