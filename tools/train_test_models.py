"""Train the small Qwen3 test models (`trained-dense`, `trained-moe`) that accuracy evidence rests on.

Random-weight presets have no learned structure (no outlier channels, near-tied experts everywhere), so
recipe gates set on them say little about a trained model. These two models are trained on Python source
code that anyone can fetch from the package index: every `.py` file of four pinned wheels (CORPUS below:
sympy, transformers, rich, click; BSD-3-Clause, Apache-2.0, MIT, BSD-3-Clause), tokenized with the real
Qwen3 tokenizer. Files whose path hashes to 0 mod 50 are held out.

    # with the package index: download the wheels, tokenize, write DATA/{train,val}.npz + data.json
    python3 tools/train_test_models.py prepare --data DATA
    # on a GPU: train one model and write its checkpoint (bf16 safetensors, config.json, training.json)
    python3 tools/train_test_models.py train --data DATA --model trained-moe --steps 3000
    # the texts quantization is measured with (docs/quantization.md): held-out corpus, calibration, dev
    python3 tools/train_test_models.py quant-texts --data DATA --out TEXTS

Both keep the structural traits compilation must get right (GQA, head_dim != hidden / heads, q/k norms,
tied embeddings for the dense model and untied for the MoE, 16 experts top-4). They are narrow (hidden 32)
because the real 151,936-token vocabulary dominates their size: together about 31 MB in bf16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen3_compile.models.config import Qwen3Arch  # noqa: E402
from qwen3_compile.tokenizer import ENDOFTEXT_ID  # noqa: E402

# (requirement, license): pure-Python wheels, mathematical and modern typed library code
CORPUS = (
    ("sympy==1.13.3", "BSD-3-Clause"),
    ("transformers==4.57.1", "Apache-2.0"),
    ("rich==14.2.0", "MIT"),
    ("click==8.3.1", "BSD-3-Clause"),
)
HELD_OUT_MOD = 50

_COMMON = dict(
    vocab_size=151936,
    hidden_size=32,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
    bos_token_id=151643,
    eos_token_id=151645,
)
ARCHS = {
    "trained-dense": Qwen3Arch(**_COMMON, intermediate_size=128, tie_word_embeddings=True),
    "trained-moe": Qwen3Arch(
        **_COMMON,
        num_experts=16,
        top_k=4,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    # INT4 at the recipe's group of 128 needs layers several groups wide (the 32-wide models above have one
    # scale per row): 1024 wide, 8 groups per attention row and 24 per down_proj row. Too large to ship
    # (0.4 GB in bf16, almost all embeddings): it is trained and measured where it is used
    # (tools/wide_awq_device.sh).
    "trained-wide": Qwen3Arch(
        **(_COMMON | dict(hidden_size=1024, num_heads=16, num_kv_heads=8, head_dim=64)),
        intermediate_size=3072,
        tie_word_embeddings=True,
    ),
    # The next width for the AWQ measurement (the 32- and 1024-wide models put AWQ at 0.76-1.0 and 0.48-0.81
    # of round to nearest's increase; the published halving is at 4096): 16 groups per attention row, 48 per
    # down_proj row. About 0.5 B parameters (0.3 B of them the tied embeddings): 8 GB of fp32 weights,
    # gradients and AdamW moments.
    "trained-wider": Qwen3Arch(
        **(_COMMON | dict(hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128)),
        intermediate_size=6144,
        tie_word_embeddings=True,
    ),
}


# ---- data -------------------------------------------------------------------------------------------


def corpus_files(wheels: list[Path]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) lists of (path, text), wheel by wheel in path order; the split hashes the path."""
    train, held_out = [], []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for name in sorted(n for n in z.namelist() if n.endswith(".py")):
                text = z.read(name).decode("utf-8", errors="replace")
                (held_out if zlib.crc32(name.encode()) % HELD_OUT_MOD == 0 else train).append((name, text))
    return train, held_out


def tokenize(files: list[tuple[str, str]]) -> np.ndarray:
    from qwen3_compile.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ids: list[int] = []
    batch = [text for _, text in files]
    for start in range(0, len(batch), 64):
        for row in tok(batch[start : start + 64], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(ENDOFTEXT_ID)
    return np.asarray(ids, dtype=np.uint32)


def _wheel_for(requirement: str, folder: Path) -> Path:
    name, version = requirement.split("==")
    return folder / f"{name}-{version}-py3-none-any.whl"


def prepare(data: Path, wheels_dir: Path | None) -> None:
    data.mkdir(parents=True, exist_ok=True)
    folder = wheels_dir or data
    if wheels_dir is None:
        pip = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            str(data),
        ]
        subprocess.run([*pip, *(r for r, _ in CORPUS)], check=True)
    wheels = [_wheel_for(r, folder) for r, _ in CORPUS]
    train, held_out = corpus_files(wheels)
    train_ids, val_ids = tokenize(train), tokenize(held_out)
    np.savez_compressed(data / "train.npz", ids=train_ids)
    np.savez_compressed(data / "val.npz", ids=val_ids)
    meta = {
        "corpus": [
            {"wheel": w.name, "license": lic, "sha256": hashlib.sha256(w.read_bytes()).hexdigest()}
            for w, (_, lic) in zip(wheels, CORPUS, strict=True)
        ],
        "files": {"train": len(train), "held_out": len(held_out)},
        "tokens": {"train": int(train_ids.size), "held_out": int(val_ids.size)},
        "held_out_rule": f"zlib.crc32(path) % {HELD_OUT_MOD} == 0",
    }
    (data / "data.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


def _spaced_windows(ids: np.ndarray, count: int, window: int, offset: float) -> list[np.ndarray]:
    """`count` windows of `window` tokens at evenly spaced starts (`offset` of a spacing in)."""
    spacing = (ids.size - window) / count
    return [ids[int((i + offset) * spacing) :][:window] for i in range(count)]


def quant_texts(
    data: Path, out: Path, windows: int, window: int, wheels_dir: Path | None, offset: float = 0.0
) -> None:
    """The texts the trained models' quantization is measured with, from `prepare`'s data:

    - held_out.txt: every held-out file, in corpus order, joined by newlines (`--ppl-text`);
    - train_calibration.jsonl: `windows` {"text"} lines, each a `window`-token window of the training
      split (evenly spaced over all of it, `offset` of a spacing in, decoded with the Qwen3 tokenizer), for
      `--calibration`; other offsets draw other windows, to see how much a result owes to the draw;
    - train_dev.txt: as many windows again, half a spacing after each calibration window, joined by
      newlines: training-split text the calibration did not see, for choosing between quantizers without
      looking at the held-out files;
    - held_out_spread.txt: 64 windows evenly spaced over all the held-out tokens, joined by newlines
      (held_out.txt's first 64 windows, what `--ppl-text` scores, come from its first two files);
    - train_calibration_128.jsonl: 128 windows as train_calibration.jsonl, a tenth of their spacing in
      (at offset 0 none of them overlaps a train_dev.txt window).
    """
    from qwen3_compile.tokenizer import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    _, held_out = corpus_files([_wheel_for(r, wheels_dir or data) for r, _ in CORPUS])
    (out / "held_out.txt").write_text("\n".join(text for _, text in held_out))
    tok = load_tokenizer()
    ids = np.load(data / "train.npz")["ids"]
    calibration = [tok.decode(w.tolist()) for w in _spaced_windows(ids, windows, window, offset)]
    (out / "train_calibration.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration))
    dev = [tok.decode(w.tolist()) for w in _spaced_windows(ids, windows, window, (offset + 0.5) % 1.0)]
    (out / "train_dev.txt").write_text("\n".join(dev))
    more = [tok.decode(w.tolist()) for w in _spaced_windows(ids, 128, window, 0.1)]
    (out / "train_calibration_128.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in more))
    val = np.load(data / "val.npz")["ids"]
    spread = [tok.decode(w.tolist()) for w in _spaced_windows(val, 64, window, 0.0)]
    (out / "held_out_spread.txt").write_text("\n".join(spread))
    for name in sorted(p.name for p in out.iterdir() if p.suffix in (".txt", ".jsonl")):
        print(out / name, hashlib.sha256((out / name).read_bytes()).hexdigest())


# ---- training ---------------------------------------------------------------------------------------


def _batches(ids: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    import torch

    while True:
        starts = rng.integers(0, ids.size - seq - 1, size=batch)
        rows = np.stack([ids[s : s + seq + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(rows)


def _eval_loss(model, ids: np.ndarray, seq: int, device, max_windows: int = 256) -> float:
    import torch

    n = min(max_windows, (ids.size - 1) // seq)
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, n, 32):
            rows = [ids[w * seq : w * seq + seq + 1] for w in range(start, min(n, start + 32))]
            x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += x[:, 1:].numel()
    return total / count


def _disk_state(model, arch: Qwen3Arch) -> dict:
    """Weights in the on-disk Hugging Face layout: bf16, one matrix per expert, no tied lm_head."""
    import torch

    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name in [n for n in state if n.endswith("mlp.experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        gate_up, down = state.pop(name), state.pop(prefix + "down_proj")
        inter = arch.moe_intermediate_size
        for e in range(arch.num_experts):
            state[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :inter].contiguous()
            state[f"{prefix}{e}.up_proj.weight"] = gate_up[e, inter:].contiguous()
            state[f"{prefix}{e}.down_proj.weight"] = down[e].contiguous()
    return state


def train(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    arch = ARCHS[args.model]
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = arch.to_transformers_config()
    if arch.is_moe:
        config.output_router_logits = True  # adds the load-balancing loss: no collapsed routers
        config.router_aux_loss_coef = args.aux_loss
    model = (Qwen3MoeForCausalLM if arch.is_moe else Qwen3ForCausalLM)(config).to(device)
    if arch.tie_word_embeddings:
        model.tie_weights()
    train_ids = np.load(args.data / "train.npz")["ids"]
    val_ids = np.load(args.data / "val.npz")["ids"]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )

    def lr_at(step: int) -> float:  # linear warm-up, cosine down to a tenth
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))

    batches = _batches(train_ids, args.batch, args.seq, np.random.default_rng(args.seed))
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = next(batches).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=x[:, :-1])
            ce = torch.nn.functional.cross_entropy(
                out.logits.float().reshape(-1, config.vocab_size), x[:, 1:].reshape(-1)
            )
            loss = ce + (args.aux_loss * out.aux_loss if arch.is_moe else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            curve.append((step, round(ce.item(), 4)))
            print(
                f"step {step:5d}  loss {ce.item():.4f}  lr {lr_at(step):.2e}  "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    model.eval()
    val_loss = _eval_loss(model, val_ids, args.seq, device)
    train_loss = _eval_loss(model, train_ids, args.seq, device)
    seconds = time.perf_counter() - started

    out_dir = args.out / args.model
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_disk_state(model, arch), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(
        json.dumps({**arch.to_hf_dict(), "torch_dtype": "bfloat16"}, indent=2)
    )
    data_meta = json.loads((args.data / "data.json").read_text())
    record = {
        "model": args.model,
        "command": "python3 tools/train_test_models.py train " + " ".join(sys.argv[2:]),
        "data": data_meta,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_seen": args.steps * args.batch * args.seq,
        "lr": args.lr,
        "seed": args.seed,
        "final_train_loss": round(train_loss, 4),
        "held_out_loss": round(val_loss, 4),
        "held_out_perplexity": round(math.exp(val_loss), 3),
        "loss_curve": curve,
        "seconds": round(seconds, 1),
        "hardware": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("loss_curve", "data")}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download and tokenize the corpus")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--wheels", type=Path, help="a folder already holding the CORPUS wheels")
    q = sub.add_parser("quant-texts", help="write the held-out, calibration and dev texts")
    q.add_argument("--data", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--windows", type=int, default=40)
    q.add_argument("--window", type=int, default=256)
    q.add_argument("--wheels", type=Path, help="a folder already holding the CORPUS wheels")
    q.add_argument(
        "--offset", type=float, default=0.0, help="calibration windows this fraction of their spacing in"
    )
    t = sub.add_parser("train", help="train one model")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--model", choices=sorted(ARCHS), required=True)
    t.add_argument("--out", type=Path, default=ROOT / "qwen3_compile" / "models" / "trained")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--aux-loss", type=float, default=0.01)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.data, args.wheels)
    elif args.cmd == "quant-texts":
        if not 0.0 <= args.offset < 1.0:
            parser.error(f"--offset {args.offset}: give a fraction of the window spacing, 0 <= offset < 1")
        quant_texts(args.data, args.out, args.windows, args.window, args.wheels, args.offset)
    else:
        train(args)


if __name__ == "__main__":
    main()
