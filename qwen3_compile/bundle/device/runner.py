#!/usr/bin/env python3
"""Chat with a qwen3-compile Jetson bundle: TensorRT on the device, ONNX Runtime for a CPU smoke test.

    python3 runner.py chat -p "Why is the sky blue?" [--think/--no-think] [--greedy] [--backend trt|ort]
    python3 runner.py unpack BUNDLE.tar.gz DIR      # safe extraction into a new or empty DIR
    python3 runner.py check                          # sha256 of every file against manifest.json, no links

Needs numpy and tokenizers; the TensorRT backend needs TensorRT's Python bindings (JetPack) and the CUDA
runtime library; the ONNX Runtime backend needs onnxruntime and onnx. Deliberately standalone: it does
not import qwen3_compile. Reasoning (everything before the `</think>` token id) goes to stderr, the
answer to stdout; tokens/s at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# no __pycache__ inside the bundle: `check` would (rightly) report it as an unlisted file
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_files import (  # noqa: E402
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_TOTAL_BYTES,
    BundleError,
    Limits,
    check_files,
    parse_size,
    read_manifest,
    safe_extract,
    tree_files,
)
from trt_backend import TensorRTBackend  # noqa: E402  (imports tensorrt only when used)

THINK_START, THINK_END = 151667, 151668  # <think>, </think>
STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
EMPTY_THINK = "<think>\n\n</think>\n\n"
# Qwen3 model-card sampling per mode: (temperature, top_p, top_k)
SAMPLING = {True: (0.6, 0.95, 20), False: (0.7, 0.8, 20)}


# ---------------------------------------------------------------- prompt and text
def render_prompt(bundle: Path, messages: list[dict], thinking: bool) -> str:
    """The chat template of the bundle's tokenizer_config.json through jinja2 when it is installed (as
    transformers renders it), else Qwen3's format for plain system/user messages."""
    config = json.loads((bundle / "model" / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        template = None
    if template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, enable_thinking=thinking
        )
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n" + ("" if thinking else EMPTY_THINK)


class StreamDecoder:
    """Incremental detokenization: text is released only when it does not end inside a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


def choose_token(logits: np.ndarray, greedy: bool, thinking: bool, rng: np.random.Generator) -> int:
    if greedy:
        return int(np.argmax(logits))
    temperature, top_p, top_k = SAMPLING[thinking]
    top = np.argsort(-logits)[:top_k]  # top-k, then top-p within it (transformers' order)
    probs = np.exp((logits[top] - logits[top[0]]) / temperature)
    probs /= probs.sum()
    keep = np.searchsorted(np.cumsum(probs), top_p) + 1
    probs = probs[:keep] / probs[:keep].sum()
    return int(top[rng.choice(keep, p=probs)])


# ---------------------------------------------------------------- ONNX Runtime (CPU smoke test)
def map_plugin_nodes(model, reference_dir: Path) -> int:
    """Replace each `trt.plugins::Qwen3MoE` node (ORT cannot run TensorRT plugins) by a call of the
    reference `qwen3_compile::ExpertDispatch` function shipped in reference/, on the same weights.
    INT8 plugin weights are dequantized in front of the call exactly as DequantizeLinear does (q * row
    scale); INT4 ones (per-group scales [E, rows, cols / G]) by the canonical graph's own blocked
    DequantizeLinear (axis 2, block G). Returns how many nodes were mapped."""
    import onnx
    import onnx.parser
    from onnx import helper

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    mapped, nodes = 0, []
    for node in model.graph.node:
        if node.op_type != "Qwen3MoE":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input[:4])
        if (
            len(node.input) == 6
        ):  # int8 weights [E, rows, cols] + row scales [E, rows], or int4 + group scales
            for i, (q, scale) in enumerate(((node.input[2], node.input[4]), (node.input[3], node.input[5]))):
                p = f"{node.name}/ort_dequant{i}"
                if len(dims.get(scale, ())) == 3:  # int4: [E, rows, cols] with scales [E, rows, cols / G]
                    group = dims[q][2] // dims[scale][2]
                    dq = helper.make_node(
                        "DequantizeLinear", [q, scale], [f"{p}/w"], axis=2, block_size=group
                    )
                    nodes.append(dq)
                    inputs[2 + i] = f"{p}/w"
                    continue
                nodes += [
                    helper.make_node("Constant", [], [f"{p}/axes"], value_ints=[2]),
                    helper.make_node("Unsqueeze", [scale, f"{p}/axes"], [f"{p}/scale"]),
                    helper.make_node("CastLike", [q, f"{p}/scale"], [f"{p}/q"]),
                    helper.make_node("Mul", [f"{p}/q", f"{p}/scale"], [f"{p}/w"]),
                ]
                inputs[2 + i] = f"{p}/w"
        activation = attrs.get("activation", b"silu")
        nodes.append(
            helper.make_node(
                "ExpertDispatch",
                inputs,
                list(node.output),
                name=node.name,
                domain="qwen3_compile",
                top_k=int(attrs["top_k"]),
                normalize=int(attrs["normalize"]),
                activation=activation.decode() if isinstance(activation, bytes) else activation,
            )
        )
        mapped += 1
    if not mapped:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(f.name == "ExpertDispatch" for f in model.functions):
        fn = onnx.parser.parse_function((reference_dir / "expert_dispatch.onnxtxt").read_text())
        del fn.opset_import[:]
        fn.opset_import.append(helper.make_opsetid("", opset))
        model.functions.append(fn)
    domains = {o.domain for o in model.opset_import}
    if "qwen3_compile" not in domains:
        model.opset_import.append(helper.make_opsetid("qwen3_compile", 1))
    return mapped


class OrtBackend:
    name = "ort"

    def __init__(self, bundle: Path, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        model_path = bundle / "model" / "model.onnx"
        model = onnx.load(str(model_path), load_external_data=False)
        unknown = {n.domain for n in model.graph.node} - {"", "ai.onnx", "qwen3_compile", "trt.plugins"}
        if unknown:
            raise SystemExit(f"error: ONNX Runtime cannot run nodes of domains {sorted(unknown)}")
        self.mapped = map_plugin_nodes(model, bundle / "reference")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        manifest = read_manifest(bundle)
        if manifest.get("ort_optimization") == "basic":  # FP8 QDQ on ORT CPU (DESIGN.md section 3)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # quantize --ort-qdq: run the QDQ graph as written (reference) or through ORT's int8 fusions (fused)
        for key, value in (manifest.get("ort_session_config") or {}).items():
            options.add_session_config_entry(str(key), str(value))
        # written beside model.onnx so its external data (if any) resolves; removed once loaded
        scratch = model_path.parent / f".ort-{os.getpid()}.onnx"
        try:
            onnx.save_model(model, str(scratch))
            self.session = ort.InferenceSession(str(scratch), options, providers=["CPUExecutionProvider"])
        finally:
            scratch.unlink(missing_ok=True)
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.layers = len(past) // 2
        dtype = np.float16 if past[0].type == "tensor(float16)" else np.float32
        self.cache = [np.zeros((1, past[0].shape[1], 0, past[0].shape[3]), dtype) for _ in past]
        self.outputs = ["logits"] + [
            f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")
        ]

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = self.cache[2 * i]
            feeds[f"past_key_values.{i}.value"] = self.cache[2 * i + 1]
        logits, *self.cache = self.session.run(self.outputs, feeds)
        return logits[0, -1].astype(np.float32)


# ---------------------------------------------------------------- chat
def generate(backend, prompt_ids: list[int], max_new: int, choose, on_token, chunk: int = 512) -> dict:
    ids = np.asarray([prompt_ids], dtype=np.int64)
    start = time.perf_counter()
    for begin in range(0, len(prompt_ids), chunk):
        end = min(begin + chunk, len(prompt_ids))
        logits = backend.forward(
            ids[:, begin:end], np.ones((1, end), np.int64), np.arange(begin, end, dtype=np.int64)[None]
        )
    token = choose(logits)
    prefill_s, decode_s, generated = time.perf_counter() - start, 0.0, [token]
    while True:
        on_token(token)
        if token in STOP_IDS or len(generated) >= max_new:
            break
        start = time.perf_counter()
        position = len(prompt_ids) + len(generated) - 1
        logits = backend.forward(
            np.asarray([[token]], np.int64), np.ones((1, position + 1), np.int64), np.asarray([[position]])
        )
        token = choose(logits)
        decode_s += time.perf_counter() - start
        generated.append(token)
    steps = len(generated) - 1
    return {
        "generated_ids": generated,
        "finish_reason": "stop" if generated[-1] in STOP_IDS else "length",
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "tokens_per_s": steps / decode_s if steps and decode_s > 0 else None,
    }


def chat(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    tree_files(bundle)  # no link or special file: nothing below reads or writes through one (lstat only)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "model" / "tokenizer.json"))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    prompt_ids = tokenizer.encode(render_prompt(bundle, messages, args.think), add_special_tokens=False).ids
    backend = (
        OrtBackend(bundle, args.threads) if args.backend == "ort" else TensorRTBackend(bundle, args.engine)
    )
    rng = np.random.default_rng(args.seed)
    texts = {"reasoning": StreamDecoder(tokenizer), "answer": StreamDecoder(tokenizer)}
    state = {"channel": "reasoning" if args.think else "answer"}
    dim = sys.stderr.isatty()

    def on_token(token: int) -> None:
        if token == THINK_END:
            state["channel"] = "answer"
            if not args.json:
                print(file=sys.stderr)
            return
        if token in STOP_IDS or token == THINK_START or args.json:
            return
        piece = texts[state["channel"]].push(token)
        if state["channel"] == "reasoning":
            sys.stderr.write(f"\033[2m{piece}\033[0m" if dim and piece else piece)
            sys.stderr.flush()
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()

    greedy = args.greedy
    result = generate(
        backend, prompt_ids, args.max_new_tokens, lambda x: choose_token(x, greedy, args.think, rng), on_token
    )
    if hasattr(backend, "close"):
        backend.close()
    ids = [t for t in result["generated_ids"] if t not in STOP_IDS]
    end = len(ids) - 1 - ids[::-1].index(THINK_END) if THINK_END in ids else -1
    reasoning = [t for t in ids[: max(end, 0)] if t != THINK_START]
    answer = ids[end + 1 :]
    speed = result["tokens_per_s"]
    if args.json:
        print(
            json.dumps(
                result
                | {
                    "backend": backend.name,
                    "prompt_ids": list(prompt_ids),
                    "reasoning": tokenizer.decode(reasoning, skip_special_tokens=True),
                    "answer": tokenizer.decode(answer, skip_special_tokens=True),
                    "plugin_nodes_mapped": getattr(backend, "mapped", None),
                }
            )
        )
    else:
        print()
        rate = f"{speed:.1f} tok/s" if speed else "n/a tok/s"
        print(
            f"[{backend.name}] {len(result['generated_ids'])} tokens, decode {rate}, "
            f"prefill {len(prompt_ids)} tokens in {result['prefill_s'] * 1e3:.0f} ms",
            file=sys.stderr,
        )
    return 0


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """What extraction and checks accept (sizes: 200G, 512M, bytes); raise them for a bundle you trust."""
    for flag, default, kind in (
        ("--max-total-size", MAX_TOTAL_BYTES, parse_size),
        ("--max-file-size", MAX_FILE_BYTES, parse_size),
        ("--max-files", MAX_FILES, int),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"(default {default})")


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat", help="chat with the model")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--system")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--greedy", action="store_true", help="most likely token (default: model-card sampling)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--backend", choices=("trt", "ort"), default="trt")
    p.add_argument("--engine", type=Path, help="TensorRT plan (default: engine/model.plan)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of streamed text")
    p.add_argument("--bundle", default=str(here), help=argparse.SUPPRESS)
    u = sub.add_parser("unpack", help="extract a bundle safely and check its files")
    u.add_argument("archive")
    u.add_argument("dest", help="a new folder, or an empty one (nothing is overwritten)")
    add_limit_flags(u)
    c = sub.add_parser("check", help="check every file's sha256 against manifest.json")
    c.add_argument("--bundle", default=str(here))
    add_limit_flags(c)
    args = parser.parse_args(argv)
    where = args.archive if args.command == "unpack" else args.bundle
    try:
        if args.command in ("unpack", "check"):
            limits = Limits(args.max_total_size, args.max_file_size, args.max_files)
        if args.command == "unpack":
            names = safe_extract(args.archive, args.dest, limits)
            print(f"extracted {len(names)} files into {args.dest}; every sha256 matches manifest.json")
            return 0
        if args.command == "check":
            manifest = check_files(args.bundle, limits=limits)
            print(f"ok: {len(manifest['files'])} files match manifest.json")
            return 0
        return chat(args)
    except BundleError as err:  # 2: refused (unsafe, malformed), 1: a file differs from the manifest
        print(f"error: in {where}: {err}. Fix: {err.fix}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
