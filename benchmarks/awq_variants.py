"""AWQ search variants on the trained models: perplexity increase and top-1 against the fp32 model, one run.

    python3 tools/train_test_models.py prepare --data DATA
    python3 tools/train_test_models.py quant-texts --data DATA --out TEXTS
    python3 benchmarks/awq_variants.py --texts TEXTS [--models trained-dense,trained-moe] [--variants rtn,awq]
        [--score dev,built-in,held-out,held-out-spread] [--group-size 32]

Every variant calibrates on TEXTS/train_calibration.jsonl (40 windows of the training split) at INT4 group
32 (`--group-size`) with int4-awq's grid (20), clipping grid (10) and search tokens (4096). The quantized
model is the fp32 PyTorch model with the searched scales folded in (`awq_fold.awq_transforms`) and the
selected weights fake-quantized: what the ONNX artifact computes (`validate`'s recipe model). Scored texts,
256-token windows through the whole window at once: `dev` (TEXTS/train_dev.txt, training-split windows the
calibration did not see: the one to choose by), `built-in` (the project's own Python, `validate --ppl`),
`held-out` (the first 64 windows of TEXTS/held_out.txt, as `quant_accuracy.py --ppl-text` scores) and
`held-out-spread` (64 windows spread over every held-out file).

Variants (each alone unless named together):
- `rtn`: round to nearest; `awq`: the shipped search (int4-awq);
- `duo`: also AutoAWQ's s = mean|X|^a / mean|W|^(1-a) family on the same grid (the better of the two kept);
- `sequential`: each layer searched on the output of the earlier layers as quantized (GPTQ-style
  sequential calibration) rather than the float model's;
- `clip-experts`: the MoE experts' weights clipped too, per expert on the tokens routed to it;
- `refine`: from the grid's best, 100 Adam steps on log s against the same block loss (straight-through
  rounding), the exact loss checked every 10 steps and the best kept (never worse on the calibration set);
- `more-tokens`: 128 calibration windows (TEXTS/train_calibration_128.jsonl) and every one of their
  tokens in the search;
- `combo`: duo + sequential + clip-experts + refine;
- `gptq`, `awq+gptq`: GPTQ's error-compensated rounding (damping 0.01, static groups, each group's largest
  weight pinned to +-7 so the artifact's round-to-nearest scale is the same) on the float or AWQ-scaled
  weights, Hessians from the same calibration activations. Not AWQ: a reference point for how far any
  rounding of these 32-wide weights gets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_export import markdown_table  # noqa: E402

GROUP, GRID, CLIP_GRID, MAX_TOKENS, SAMPLES = 32, 20, 10, 4096, 40
VARIANTS = {
    "rtn": None,
    "awq": {},
    "duo": {"duo": True},
    "sequential": {"sequential": True},
    "clip-experts": {"clip_experts": True},
    "refine": {"refine_steps": 100},
    "more-tokens": {"samples": 128, "max_tokens": 1 << 20, "calibration": "train_calibration_128.jsonl"},
    "combo": {"duo": True, "sequential": True, "clip_experts": True, "refine_steps": 100},
    "gptq": {"gptq": True, "grid": 1, "clip_grid": 0},
    "awq+gptq": {"gptq": True},
}


def fake_int4_ste(w, group: int):
    """`awq.fake_int4` with a straight-through gradient for the rounding (the group scale's own kept)."""
    from qwen3_compile.quantize.weights import INT4_MAX

    g = w.reshape(*w.shape[:-1], w.shape[-1] // group, group)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / INT4_MAX
    q = g / scale
    q = q + (q.round().clamp(-INT4_MAX, INT4_MAX) - q).detach()
    return (q * scale).reshape(w.shape)


def _weight_mean(problem, group: int):
    """AutoAWQ's w_mean: per input channel, the mean over rows of |w| / its group's max |w|."""
    from qwen3_compile.quantize.awq import Problem

    weights = (
        [w for _, w in problem.parts]
        if isinstance(problem, Problem)
        else [problem.params[n] for n in problem.scaled]
    )
    rows = [w.reshape(-1, w.shape[-1]) for w in weights]
    total = 0
    for r in rows:
        g = r.reshape(len(r), -1, group).abs()
        total = total + (g / g.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(r.shape).sum(0)
    return total / sum(len(r) for r in rows)


def _trainable(problem):
    """A copy of the problem whose tensors can take gradients (calibration runs in inference mode)."""
    from qwen3_compile.quantize.awq import Problem

    if isinstance(problem, Problem):
        return Problem([(x.clone(), w.clone()) for x, w in problem.parts], problem.tie)
    if problem._want is None:
        problem._want = problem._run(problem.params)
    return dataclasses.replace(
        problem,
        params={n: t.clone() for n, t in problem.params.items()},
        inputs=[x.clone() for x in problem.inputs],
        _want=[w.clone() for w in problem._want],
    )


def refine(problem, free, steps: int, lr: float = 0.02):
    """Adam on log s from `free`; the exact loss every 10 steps, the best scales seen kept."""
    import torch

    def tied(v):
        return problem.tie.expand(v) if problem.tie is not None else v

    with torch.inference_mode(False), torch.enable_grad():
        problem = _trainable(problem)
        best, best_loss = free, float(problem.loss(tied(free), GROUP))
        log_s = free.detach().clone().log().requires_grad_(True)
        opt = torch.optim.Adam([log_s], lr=lr)
        for step in range(steps):
            loss = problem.loss(tied(log_s.exp()), GROUP, fake_int4_ste)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 9:
                with torch.no_grad():
                    candidate = log_s.detach().exp()
                    candidate = candidate / (candidate.max() * candidate.min()).sqrt()
                    exact = float(problem.loss(tied(candidate), GROUP))
                if exact < best_loss:
                    best, best_loss = candidate, exact
    return best, best_loss


def gptq(w, hessian, group: int, damp: float = 0.01):
    """GPTQ (static groups, natural column order) of w [out, in]; each group's largest |w| is pinned to
    +-7 steps, so round to nearest of the result finds the same scale and values."""
    import torch

    w, h = w.double().clone(), hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g = w.reshape(len(w), -1, group)
    amax = g.abs().amax(-1)
    delta = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    pin, sign = g.abs().argmax(-1), torch.sign(g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0])
    out = torch.zeros_like(w)
    for i in range(w.shape[1]):
        k, c = divmod(i, group)
        q = (w[:, i] / delta[:, k]).round().clamp(-7, 7)
        q = torch.where(pin[:, k] == c, sign[:, k] * 7, q)
        out[:, i] = q * delta[:, k]
        err = (w[:, i] - out[:, i]) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
    return out


def variant_search_class():
    from qwen3_compile.quantize.awq import AwqSearch, fake_int4, search, search_clip
    from qwen3_compile.quantize.awq_fold import layer_transforms

    @dataclasses.dataclass
    class VariantSearch(AwqSearch):
        duo: bool = False
        refine_steps: int = 0
        clip_experts: bool = False
        sequential: bool = False
        gptq: bool = False
        selects: object = None
        hessians: dict = dataclasses.field(default_factory=dict)

        def _search(self, problem):
            import torch

            free, info = search(problem, self.grid, self.group)
            free = torch.from_numpy(free)
            if self.duo:  # the x / w family on the same grid; the better of the two
                w_mean, x_mean = _weight_mean(problem, self.group), problem.mean_abs()
                if problem.tie is not None:
                    w_mean, x_mean = problem.tie.reduce(w_mean), problem.tie.reduce(x_mean)
                for i in range(self.grid):
                    a = i / self.grid
                    s = (x_mean.clamp(min=1e-4).pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
                    s = s / (s.max() * s.min()).sqrt()
                    loss = float(problem.loss(problem.tie.expand(s) if problem.tie else s, self.group))
                    if loss < info["loss"]:
                        free, info = s, info | {"alpha": a, "loss": loss}
            if self.refine_steps:
                free, loss = refine(problem, free, self.refine_steps)
                info = info | {"loss": loss}
            return free.numpy(), info

        def __call__(self, index, layer, stats):
            super().__call__(index, layer, stats)
            p = f"model.layers.{index}."
            if self.clip_experts and self.arch.is_moe:
                self._clip_experts(p, layer, stats)
            if self.gptq:
                self._hessians(p, stats)
            if self.sequential:
                self._quantize_layer(index, layer)
            return self.sequential

        def _clip_experts(self, p, layer, stats):
            import torch

            from qwen3_compile.quantize.awq import _rows

            rows = partial(_rows, limit=self.max_tokens, seed=int(p.split(".")[2]))
            s_mlp = torch.from_numpy(self.scales[p + "mlp"])
            gate_up = layer.mlp.experts.gate_up_proj.detach().double() * s_mlp
            down = layer.mlp.experts.down_proj.detach().double().clone()
            ratios = {
                "gate_up_proj": np.ones((*gate_up.shape[:2], gate_up.shape[2] // self.group)),
                "down_proj": np.ones((*down.shape[:2], down.shape[2] // self.group)),
            }
            for e in range(len(gate_up)):
                if f"{p}down/{e}" not in self.scales:
                    continue
                s_down = torch.from_numpy(self.scales[f"{p}down/{e}"])
                w = gate_up[e].clone()
                w[len(s_down) :] /= s_down[:, None]
                x = rows(stats.samples[f"expert_in/{e}"]) / s_mlp
                ratios["gate_up_proj"][e] = search_clip(x, w, self.group, self.clip_grid)
                mid = rows(stats.samples[f"expert_mid/{e}"]) / s_down
                ratios["down_proj"][e] = search_clip(mid, down[e] * s_down, self.group, self.clip_grid)
            for name, r in ratios.items():
                self.scales[f"{p}clip/mlp.experts.{name}"] = r

        def _hessians(self, p, stats):
            import torch

            def h(key):
                x = torch.cat(stats.samples[key]).double()
                return x.T @ x / len(x)

            a = self.arch
            s_o = np.repeat(
                self.scales[p + "o"].reshape(a.num_kv_heads, 1, -1), a.num_heads // a.num_kv_heads, 1
            )
            scaled = {"attn": self.scales[p + "attn"], "o": s_o.reshape(-1), "mlp": self.scales[p + "mlp"]}
            for n in "qkv":
                self.hessians[f"{p}self_attn.{n}_proj.weight"] = (h("attn_in"), scaled["attn"])
            self.hessians[p + "self_attn.o_proj.weight"] = (h("o_in"), scaled["o"])
            if not a.is_moe:
                for n in ("gate", "up"):
                    self.hessians[f"{p}mlp.{n}_proj.weight"] = (h("mlp_in"), scaled["mlp"])
                self.hessians[p + "mlp.down_proj.weight"] = (h("down_in"), self.scales[p + "down"])
                return
            for e in range(a.num_experts):
                if f"expert_in/{e}" in stats.samples:
                    self.hessians[f"{p}mlp.experts.gate_up_proj/{e}"] = (h(f"expert_in/{e}"), scaled["mlp"])
                    self.hessians[f"{p}mlp.experts.down_proj/{e}"] = (
                        h(f"expert_mid/{e}"),
                        self.scales[f"{p}down/{e}"],
                    )

        def _quantize_layer(self, index, layer):
            import torch

            transforms = layer_transforms(self.arch, index, self.scales)
            state = {}
            for name, t in layer.state_dict().items():
                full = f"model.layers.{index}.{name}"
                v = t.detach().double().numpy()
                if t.ndim == 2 and full + ".T" in transforms:
                    v = transforms[full + ".T"](v.T).T
                elif full in transforms:
                    v = transforms[full](v)
                v = torch.from_numpy(np.ascontiguousarray(v))
                if self.selects(full):
                    v = fake_int4(v, self.group)
                state[name] = v.to(t.dtype)
            layer.load_state_dict(state, strict=True)

    return VariantSearch


def _weights(model):
    """calibrate's weight lookup over a torch model (torch layout serves both names it asks for)."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return lambda name: state[name[:-2]].T if name.endswith(".T") else state[name]


def quantized_model(loaded, scales, selects, hessians=None):
    """The fp32 model with the scales folded in and the selected weights fake-quantized (or GPTQ'd)."""
    import torch

    from qwen3_compile.models.loading import build_reference_model
    from qwen3_compile.quantize.awq_fold import awq_transforms
    from qwen3_compile.validate.recipe_reference import _transformed

    arch = loaded.arch
    transforms = awq_transforms(arch, scales) if scales else {}
    state = {}
    with torch.no_grad():
        for name, tensor in loaded.model.state_dict().items():
            if arch.tie_word_embeddings and name == "lm_head.weight":
                continue
            # fp32 in and out, as the quantizer rounds the export's fp32 weights (the folds run in fp64)
            t = _transformed(name, tensor.detach().float().clone(), transforms).float()
            if t.ndim >= 2 and selects(name) and name != "lm_head.weight":
                t = _quantize(name, t, hessians).float()
            state[name] = t
    return build_reference_model(arch, state)


def _quantize(name, t, hessians):
    from qwen3_compile.quantize.awq import fake_int4

    if hessians is None:
        return fake_int4(t, GROUP)
    if t.ndim == 2:
        h, s = hessians[name]
        return gptq(t, _scaled(h, s), GROUP)
    out = t.clone()
    for e in range(len(t)):
        found = hessians.get(f"{name}/{e}")
        out[e] = fake_int4(t[e], GROUP) if found is None else gptq(t[e], _scaled(found[0], found[1]), GROUP)
    return out


def _scaled(h, s):
    import torch

    s = torch.from_numpy(np.asarray(s, dtype=np.float64))
    return h / s[:, None] / s[None, :]  # the input the scaled weight reads is X / s


class Scorer:
    """Perplexity increase and top-1 agreement on fixed windows; the float side computed once."""

    def __init__(self, model, rows: np.ndarray, batch: int = 4, device: str = "cpu"):
        import torch

        self.rows, self.batch, self.device, self.nll, self.top = rows, batch, device, [], []
        with torch.no_grad():
            for x in self._batches():
                logp = torch.log_softmax(model(input_ids=x).logits.float()[:, :-1], -1)
                self.nll.append(-logp.gather(-1, x[:, 1:, None])[..., 0].flatten())
                self.top.append(logp.argmax(-1).flatten())
        self.reference = torch.cat(self.nll).double().mean()

    def _batches(self):
        import torch

        for b in range(0, len(self.rows), self.batch):
            yield torch.from_numpy(self.rows[b : b + self.batch]).to(self.device)

    def __call__(self, model) -> tuple[float, float]:
        import torch

        nll, agree = [], []
        with torch.no_grad():
            for x, top in zip(self._batches(), self.top, strict=True):
                logp = torch.log_softmax(model(input_ids=x).logits.float()[:, :-1], -1)
                nll.append(-logp.gather(-1, x[:, 1:, None])[..., 0].flatten())
                agree.append((logp.argmax(-1).flatten() == top).float())
        increase = torch.expm1(torch.cat(nll).double().mean() - self.reference)
        return float(increase), float(torch.cat(agree).mean())


def _rows(tokenizer, path: Path | None, max_windows: int | None) -> np.ndarray:
    from qwen3_compile.validate.perplexity import read_text, windows_of

    _, text = read_text(path)
    return windows_of(tokenizer(text, add_special_tokens=False)["input_ids"], 256, max_windows, str(path))


TEXTS = {  # name: (file in TEXTS or None for the built-in text, windows)
    "dev": ("train_dev.txt", 64),
    "built-in": (None, None),
    "held-out": ("held_out.txt", 64),
    "held-out-spread": ("held_out_spread.txt", 64),
}


def run(model: str, texts: Path, variants: list[str], scored: list[str], device: str = "cpu") -> list[dict]:
    from qwen3_compile.models.loading import load_model
    from qwen3_compile.quantize.calibrate import calibrate
    from qwen3_compile.quantize.calibration_data import load_calibration
    from qwen3_compile.quantize.recipe import load_recipe
    from qwen3_compile.tokenizer import load_tokenizer

    tokenizer, loaded = load_tokenizer(), load_model(model)
    selects = load_recipe("int4-awq").select.selects
    scorers = {}
    float_model = copy.deepcopy(loaded.model).to(device)  # the search reads loaded.model on the CPU
    for name in scored:
        file, windows = TEXTS[name]
        rows = _rows(tokenizer, texts / file if file else None, windows)
        scorers[name] = Scorer(float_model, rows, device=device)
    del float_model
    rows, search_class = [], variant_search_class()
    for label in variants:
        options = VARIANTS[label]
        scales, hessians = {}, None
        if options is not None:
            options = dict(options)
            calibration = texts / options.pop("calibration", "train_calibration.jsonl")
            samples, max_tokens = options.pop("samples", SAMPLES), options.pop("max_tokens", MAX_TOKENS)
            grid, clip_grid = options.pop("grid", GRID), options.pop("clip_grid", CLIP_GRID)
            search = search_class(loaded.arch, grid, GROUP, max_tokens, clip_grid, selects=selects, **options)
            calibrate(
                loaded.arch,
                _weights(loaded.model),
                load_calibration(tokenizer, calibration, samples),
                on_layer=search,
            )
            scales, hessians = search.scales, (search.hessians if search.gptq else None)
        quantized = quantized_model(loaded, scales, selects, hessians).to(device)
        row = {"model": model, "variant": label}
        for name, scorer in scorers.items():
            increase, top1 = scorer(quantized)
            row[name] = f"{increase:+.2%} ({top1:.3f})"
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    global GROUP  # one group size for the whole run: the search, the rounding and the refinement read it
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=Path, required=True, help="`quant-texts --out` folder")
    parser.add_argument("--models", default="trained-dense,trained-moe")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {', '.join(VARIANTS)}")
    parser.add_argument("--score", default=",".join(TEXTS), help=f"a subset of {', '.join(TEXTS)}")
    parser.add_argument("--group-size", type=int, default=GROUP, help="INT4 group (32: the 32-wide models)")
    parser.add_argument("--device", default="cpu", help="where the scored models run (cpu, cuda)")
    args = parser.parse_args()
    GROUP = args.group_size
    variants, scored = args.variants.split(","), args.score.split(",")
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(scored) - set(TEXTS))
    if unknown:
        parser.error(f"unknown variants or texts {unknown}")
    rows = []
    for model in args.models.split(","):
        rows += run(model, args.texts, variants, scored, args.device)
    columns = [("model", "model", "s"), ("variant", "variant", "s")]
    columns += [(f"{name}: ppl + (top-1)", name, "s") for name in scored]
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
