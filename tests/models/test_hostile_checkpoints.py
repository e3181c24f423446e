"""Checkpoints a hostile user hands us. Each case damages a tiny valid checkpoint; `inspect` and `export`
must then exit 2 within seconds, print no traceback, name the file or field, and leave every input file
byte-identical. Special files (pipes, devices, sockets) run in a subprocess with a timeout, so a regression
fails instead of hanging the suite."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

import qwen3_compile
from qwen3_compile.cli import main
from qwen3_compile.errors import BadInputError

INDEX = "model.safetensors.index.json"
SHARD_2 = "model-00002-of-00002.safetensors"
SECONDS = 10  # refusing any of these takes milliseconds; more means a scan or a parse ran away


# ---- damage helpers: each returns a function of the checkpoint folder ---------------------------


def config(**changes) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(changes)
        (ckpt / "config.json").write_text(json.dumps(cfg))

    return damage


def quantized(**fields) -> Callable[[Path], None]:
    return config(quantization_config=fields)


def config_text(edit: Callable[[str], str | bytes]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        new = edit((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_bytes(new if isinstance(new, bytes) else new.encode())

    return damage


def header(edit: Callable[[dict], dict | bytes], file: str = "model.safetensors") -> Callable[[Path], None]:
    """Rewrite the safetensors header (its length field follows), keeping the data bytes."""

    def damage(ckpt: Path) -> None:
        data = (ckpt / file).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        new = edit(json.loads(data[8 : 8 + n]))
        raw = new if isinstance(new, bytes) else json.dumps(new).encode()
        (ckpt / file).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    return damage


def raw_file(edit: Callable[[bytes], bytes], file: str = "model.safetensors") -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        (ckpt / file).write_bytes(edit((ckpt / file).read_bytes()))

    return damage


def tensor(key: str, value, name: str = "model.layers.0.self_attn.q_norm.weight") -> Callable:
    """One field of one tensor's header entry."""
    return header(lambda h: h | {name: h[name] | {key: value}})


def overlap(h: dict) -> dict:
    """The later of two same-size tensors takes the earlier one's bytes."""
    names = ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight")
    first, second = sorted(names, key=lambda n: h[n]["data_offsets"])
    return h | {second: h[second] | {"data_offsets": h[first]["data_offsets"]}}


def duplicate_tensor(h: dict) -> bytes:
    name = "model.norm.weight"
    return (json.dumps(h)[:-1] + f', "{name}": {json.dumps(h[name])}}}').encode()


def index(edit: Callable[[dict], dict | bytes | str]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        new = edit(json.loads((ckpt / INDEX).read_text()))
        text = new if isinstance(new, str | bytes) else json.dumps(new)
        (ckpt / INDEX).write_bytes(text if isinstance(text, bytes) else text.encode())

    return damage


def shard_named(name: Callable[[Path], str], move: bool = True) -> Callable[[Path], None]:
    """Point the index's shard-2 tensors at `name(ckpt)`; `move` puts the real shard there first (a copy
    outside the folder, a sub-folder), so a reader that follows the index would find valid weights."""

    def damage(ckpt: Path) -> None:
        target = name(ckpt)
        if move:
            (ckpt / target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(ckpt / SHARD_2, ckpt / target)  # an absolute target stays absolute

        def point(i: dict) -> dict:
            return i | {"weight_map": {t: target if s == SHARD_2 else s for t, s in i["weight_map"].items()}}

        index(point)(ckpt)

    return damage


def sparse(file: str, size: int) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        os.truncate(ckpt / file, size)  # a hole: gigabytes on paper, nothing on disk

    return damage


def replaced_by(make: Callable[[Path], object], name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        (ckpt / name).unlink()
        make(ckpt / name)

    return damage


def deep(text: str) -> str:
    return text[:-1] + ', "extra": ' + "[" * 10_000 + "]" * 10_000 + "}"


# (case id, checkpoint kind, damage, substrings the message must hold)
# kinds: "dense", "moe", "sharded" (dense in two shards with an index)
CASES = [
    # ---- config.json: JSON itself
    ("config-nan-literal", "dense", config_text(lambda t: t.replace("1000000.0,", "NaN,", 1)), "NaN"),
    ("config-infinity-literal", "dense", config_text(lambda t: t.replace("1e-06", "Infinity")), "Infinity"),
    ("config-float-overflow", "dense", config_text(lambda t: t.replace("1e-06", "1e999")), "1e999"),
    ("config-duplicate-key", "dense", config_text(lambda t: t[:-1] + ', "hidden_size": 4}'), "'hidden_size'"),
    ("config-top-level-list", "dense", config_text(lambda t: "[" + t + "]"), "JSON object"),
    ("config-not-utf8", "dense", config_text(lambda t: t.encode().replace(b"silu", b"s\xffu")), "UTF-8"),
    ("config-utf16", "dense", config_text(lambda t: t.encode("utf-16")), "UTF-8"),
    ("config-empty", "dense", config_text(lambda t: ""), "not valid JSON"),
    ("config-nested-10000", "dense", config_text(deep), "too deeply"),
    ("config-1gb", "dense", sparse("config.json", 1 << 30), "more than"),
    ("config-huge-int", "dense", config_text(lambda t: t.replace(": 32,", f": {'9' * 5000},", 1)), "digits"),
    # ---- config.json: every field we read, type and range
    ("rope-theta-negative", "dense", config(rope_theta=-1.0, rope_parameters=None), "'rope_theta'"),
    ("rope-theta-zero", "dense", config(rope_theta=0, rope_parameters=None), "'rope_theta'"),
    ("rope-theta-string", "dense", config(rope_theta="1e6"), "'rope_theta'"),
    ("rope-theta-huge", "dense", config(rope_theta=1e300, rope_parameters=None), "'rope_theta'"),
    ("rope-theta-disagree", "dense", config(rope_theta=1e7), "'rope_theta'"),
    ("rope-nested-negative", "dense", config(rope_theta=None, rope_parameters={"rope_theta": -5.0}), "rope"),
    ("rope-parameters-string", "dense", config(rope_parameters="default"), "'rope_parameters'"),
    ("rope-scaling-yarn", "dense", config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    ("rope-unknown-key", "dense", config(rope_parameters={"rope_theta": 1e6, "factor": 2.0}), "factor"),
    # quantization_config: the published formats are imported (tests/models/test_quantized_import.py); a
    # config that names one wrongly, or a method or version we do not import, is refused by field
    ("quantized-fp8-no-block", "moe", quantized(quant_method="fp8"), "weight_block_size"),
    ("quantized-awq-no-group", "dense", quantized(quant_method="awq", bits=4), "group_size"),
    ("quantized-gptq-no-group", "dense", quantized(quant_method="gptq", bits=8), "group_size"),
    ("quantized-not-a-dict", "dense", config(quantization_config="int4"), "quantization_config"),
    ("quantized-unknown-method", "dense", quantized(quant_method="bitsandbytes"), "quant_method"),
    (
        "quantized-config-float-weights",
        "dense",
        quantized(quant_method="awq", bits=4, group_size=16, version="gemm"),
        "no weight is stored quantized",
    ),
    ("rms-eps-negative", "dense", config(rms_norm_eps=-1e-6), "'rms_norm_eps'"),
    ("rms-eps-zero", "dense", config(rms_norm_eps=0.0), "'rms_norm_eps'"),
    ("rms-eps-one", "dense", config(rms_norm_eps=1.0), "'rms_norm_eps'"),
    ("rms-eps-string", "dense", config(rms_norm_eps="1e-6"), "'rms_norm_eps'"),
    ("rms-eps-bool", "dense", config(rms_norm_eps=True), "'rms_norm_eps'"),
    ("hidden-zero", "dense", config(hidden_size=0), "'hidden_size'"),
    ("hidden-negative", "dense", config(hidden_size=-32), "'hidden_size'"),
    ("hidden-float", "dense", config(hidden_size=32.5), "'hidden_size'"),
    ("hidden-bool", "dense", config(hidden_size=True), "'hidden_size'"),
    ("hidden-huge", "dense", config(hidden_size=1 << 40), "'hidden_size'"),
    ("intermediate-zero", "dense", config(intermediate_size=0), "'intermediate_size'"),
    ("intermediate-missing", "dense", config(intermediate_size=None), "'intermediate_size'"),
    ("heads-zero", "dense", config(num_attention_heads=0), "'num_attention_heads'"),
    ("kv-heads-zero", "dense", config(num_key_value_heads=0), "'num_key_value_heads'"),
    ("kv-heads-not-dividing", "dense", config(num_key_value_heads=3), "'num_key_value_heads'"),
    ("head-dim-odd", "dense", config(head_dim=15), "'head_dim'"),
    ("head-dim-negative", "dense", config(head_dim=-16), "'head_dim'"),
    ("layers-zero", "dense", config(num_hidden_layers=0), "'num_hidden_layers'"),
    ("layers-billion", "dense", config(num_hidden_layers=10**9), "'num_hidden_layers'"),
    ("layers-string", "dense", config(num_hidden_layers="1"), "'num_hidden_layers'"),
    ("vocab-negative", "dense", config(vocab_size=-256), "'vocab_size'"),
    ("vocab-huge", "dense", config(vocab_size=1 << 40), "'vocab_size'"),
    ("max-positions-zero", "dense", config(max_position_embeddings=0), "'max_position_embeddings'"),
    ("tie-string", "dense", config(tie_word_embeddings="false"), "'tie_word_embeddings'"),
    ("tie-int", "dense", config(tie_word_embeddings=1), "'tie_word_embeddings'"),
    ("hidden-act-gelu", "dense", config(hidden_act="gelu"), "'hidden_act'"),
    ("attention-bias-true", "dense", config(attention_bias=True), "'attention_bias'"),
    ("attention-bias-string", "dense", config(attention_bias="false"), "'attention_bias'"),
    ("sliding-window-on", "dense", config(use_sliding_window=True), "'use_sliding_window'"),
    ("sliding-window-string", "dense", config(use_sliding_window="no"), "'use_sliding_window'"),
    ("sliding-window-negative", "dense", config(sliding_window=-1), "'sliding_window'"),
    ("max-window-layers-float", "dense", config(max_window_layers=2.5), "'max_window_layers'"),
    ("layer-types-sliding", "dense", config(layer_types=["sliding_attention"]), "layer_types[0]"),
    ("eos-string", "dense", config(eos_token_id="2"), "'eos_token_id'"),
    ("eos-list-of-strings", "dense", config(eos_token_id=[2, "x"]), "'eos_token_id'"),
    ("eos-float", "dense", config(eos_token_id=2.5), "'eos_token_id'"),
    ("eos-bool", "dense", config(eos_token_id=True), "'eos_token_id'"),
    ("eos-negative", "dense", config(eos_token_id=-1), "'eos_token_id'"),
    ("eos-outside-vocab", "dense", config(eos_token_id=151645), "'eos_token_id'"),
    ("eos-empty-list", "dense", config(eos_token_id=[]), "'eos_token_id'"),
    ("bos-string", "dense", config(bos_token_id="1"), "'bos_token_id'"),
    ("experts-zero", "moe", config(num_experts=0, num_local_experts=0), "'num_experts'"),
    ("experts-negative", "moe", config(num_experts=-4, num_local_experts=None), "'num_experts'"),
    ("experts-million", "moe", config(num_experts=10**6, num_local_experts=None), "'num_experts'"),
    ("experts-string", "moe", config(num_experts="4", num_local_experts=None), "'num_experts'"),
    ("experts-disagree", "moe", config(num_local_experts=8), "'num_experts'"),
    ("top-k-zero", "moe", config(num_experts_per_tok=0), "'num_experts_per_tok'"),
    ("top-k-over-experts", "moe", config(num_experts_per_tok=5), "'num_experts_per_tok'"),
    ("top-k-bool", "moe", config(num_experts_per_tok=True), "'num_experts_per_tok'"),
    ("moe-intermediate-negative", "moe", config(moe_intermediate_size=-16), "'moe_intermediate_size'"),
    ("norm-topk-string", "moe", config(norm_topk_prob="true"), "'norm_topk_prob'"),
    ("norm-topk-int", "moe", config(norm_topk_prob=1), "'norm_topk_prob'"),
    ("sparse-step-two", "moe", config(decoder_sparse_step=2), "decoder_sparse_step"),
    ("sparse-step-string", "moe", config(decoder_sparse_step="1"), "'decoder_sparse_step'"),
    ("mlp-only-layers-string", "moe", config(mlp_only_layers="0"), "'mlp_only_layers'"),
    ("mlp-only-layers-set", "moe", config(mlp_only_layers=[0]), "mlp_only_layers"),
    # ---- safetensors header
    ("header-length-2^63", "dense", raw_file(lambda d: struct.pack("<Q", 1 << 63) + d[8:]), "more than"),
    ("header-length-200mb", "dense", raw_file(lambda d: struct.pack("<Q", 200 << 20) + d[8:]), "more than"),
    ("header-length-past-end", "dense", raw_file(lambda d: struct.pack("<Q", len(d)) + d[8:]), "not fit"),
    ("file-5-bytes", "dense", raw_file(lambda d: d[:5]), "too short"),
    ("header-not-json", "dense", header(lambda h: b"{not json" + b" " * 8), "not valid JSON"),
    ("header-list", "dense", header(lambda h: b"[]"), "JSON object"),
    ("header-not-utf8", "dense", header(lambda h: b'{"\xff": 1}'), "UTF-8"),
    ("header-nan", "dense", header(lambda h: json.dumps(h).replace('"pt"', "NaN").encode()), "NaN"),
    ("header-duplicate-tensor", "dense", header(duplicate_tensor), "appears twice"),
    ("header-nested", "dense", header(lambda h: b"[" * 100_000), "too deeply"),
    ("entry-not-object", "dense", header(lambda h: h | {"model.norm.weight": "F32"}), "malformed"),
    ("entry-extra-key", "dense", tensor("extra", 1), "malformed"),
    ("dtype-unknown", "dense", tensor("dtype", "F128"), "unknown dtype"),
    ("dtype-list", "dense", tensor("dtype", ["F32"]), "unknown dtype"),
    ("shape-negative", "dense", tensor("shape", [-16]), "shape"),
    ("shape-string", "dense", tensor("shape", ["16"]), "shape"),
    ("shape-float", "dense", tensor("shape", [16.0]), "shape"),
    ("shape-bool", "dense", tensor("shape", [True]), "shape"),
    ("shape-not-list", "dense", tensor("shape", 16), "shape"),
    ("offsets-reversed", "dense", header(lambda h: h | {"model.norm.weight": h["model.norm.weight"] | {
        "data_offsets": h["model.norm.weight"]["data_offsets"][::-1]}}), "corrupt header"),
    ("offsets-strings", "dense", tensor("data_offsets", ["0", "64"]), "data_offsets"),
    ("offsets-three", "dense", tensor("data_offsets", [0, 64, 128]), "data_offsets"),
    ("offsets-overlap", "dense", header(overlap), "overlaps"),
    ("offsets-past-end", "dense", tensor("data_offsets", [1 << 40, (1 << 40) + 64]), "truncated"),
    ("trailing-bytes", "dense", raw_file(lambda d: d + bytes(64)), "trailing"),
    ("metadata-int-value", "dense", header(lambda h: h | {"__metadata__": {"format": 1}}), "__metadata__"),
    ("metadata-list", "dense", header(lambda h: h | {"__metadata__": ["pt"]}), "__metadata__"),
    ("shard-header-garbage", "sharded", raw_file(lambda d: d[:8] + b"\x00" * 32 + d[40:], SHARD_2), SHARD_2),
    # ---- shard index
    ("index-absolute", "sharded", shard_named(lambda c: f"{c.parent}/outside/{SHARD_2}"), "not a shard file"),
    ("index-dotdot", "sharded", shard_named(lambda c: f"../outside/{SHARD_2}"), "not a shard file"),
    ("index-subfolder", "sharded", shard_named(lambda c: f"sub/{SHARD_2}"), "not a shard file"),
    ("index-etc-passwd", "sharded", shard_named(lambda c: "/etc/passwd", move=False), "not a shard file"),
    ("index-names-config", "sharded", shard_named(lambda c: "config.json", move=False), "not a shard file"),
    ("index-hidden-file", "sharded", shard_named(lambda c: f".{SHARD_2}"), "not a shard file"),
    ("index-shard-int", "sharded", index(lambda i: i | {"weight_map": {"model.norm.weight": 2}}), "map"),
    ("index-map-list", "sharded", index(lambda i: i | {"weight_map": list(i["weight_map"])}), "'weight_map'"),
    ("index-map-empty", "sharded", index(lambda i: i | {"weight_map": {}}), "'weight_map'"),
    ("index-duplicate-key", "sharded", index(lambda i: json.dumps(i)[:-1] + ', "weight_map": {}}'), "twice"),
    ("index-nan", "sharded", index(lambda i: json.dumps(i).replace("{", '{"x": NaN, ', 1)), "NaN"),
    ("index-top-level-list", "sharded", index(lambda i: "[]"), "JSON object"),
    ("index-100mb", "sharded", sparse(INDEX, 100 << 20), "more than"),
    ("weights-a-directory", "dense", replaced_by(Path.mkdir, "model.safetensors"), "a directory"),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, object]:
    """Every path under root: a hash of each regular file (size and mtime past 64 MB: the sparse cases),
    the target of each link, the type of anything else. Never opens a special file."""
    seen: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size <= 64 << 20:
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISREG(st.st_mode):
            seen[str(path)] = (st.st_size, st.st_mtime_ns)
        else:
            seen[str(path)] = os.readlink(path) if stat.S_ISLNK(st.st_mode) else stat.S_IFMT(st.st_mode)
    return seen


def _make(tiny_checkpoint, kind: str) -> Path:
    return tiny_checkpoint("dense", sharded=True) if kind == "sharded" else tiny_checkpoint(kind)


def _args(command: str, ckpt: Path) -> list[str]:
    return [command, str(ckpt)] + (["-o", str(ckpt.parent / "out")] if command == "export" else [])


def _assert_refused(code: int, output: str, expect: tuple[str, ...], elapsed: float) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    assert "Fix:" in output, output
    for part in expect:
        assert part in output, output
    assert elapsed < SECONDS, f"took {elapsed:.1f} s: {output}"


@pytest.mark.parametrize("command", ["inspect", "export"])
@pytest.mark.parametrize("kind, damage, expect", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_hostile_checkpoint_refused(tiny_checkpoint, tmp_path, command, kind, damage, expect):
    ckpt = _make(tiny_checkpoint, kind)
    damage(ckpt)
    before = snapshot(tmp_path)
    start = time.monotonic()
    result = CliRunner().invoke(main, _args(command, ckpt))
    _assert_refused(result.exit_code, result.output, (expect,), time.monotonic() - start)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "export"])
@pytest.mark.parametrize("kind", ["dense", "moe", "sharded"])
def test_the_undamaged_tiny_checkpoints_pass(tiny_checkpoint, tmp_path, command, kind):
    """The control: every refusal above comes from the damage, not from the tiny checkpoint."""
    ckpt = _make(tiny_checkpoint, kind)
    before = snapshot(ckpt)
    result = CliRunner().invoke(main, _args(command, ckpt))
    assert result.exit_code == 0, result.output
    assert snapshot(ckpt) == before


# ---- special files: refused before they are opened ---------------------------------------------


def fifo(name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        (ckpt / name).unlink(missing_ok=True)
        os.mkfifo(ckpt / name)

    return damage


def link_to(device: str, name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        (ckpt / name).unlink(missing_ok=True)
        (ckpt / name).symlink_to(device)

    return damage


def tokenizer(make: Callable[[str], Callable[[Path], None]]) -> Callable[[Path], None]:
    """tokenizer.json special, tokenizer_config.json real: the pair export would copy."""

    def damage(ckpt: Path) -> None:
        (ckpt / "tokenizer_config.json").write_text("{}")
        make("tokenizer.json")(ckpt)

    return damage


def unix_socket(name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        (ckpt / name).unlink()
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(ckpt / name))
        except OSError:
            pytest.skip("the tmp path is too long for a unix socket")
        finally:
            sock.close()  # the socket file stays

    return damage


def index_to_outside_pipe(ckpt: Path) -> None:
    """A pipe outside the folder: refused by its name in the index, never opened (opening it would hang)."""
    os.mkfifo(ckpt.parent / "outside.safetensors")
    shard_named(lambda c: str(c.parent / "outside.safetensors"), move=False)(ckpt)


SPECIAL_FILE = "not a regular file"
SPECIAL = [
    ("fifo-weights", "moe", fifo("model.safetensors"), ("model.safetensors", SPECIAL_FILE)),
    ("fifo-shard", "sharded", fifo(SHARD_2), (SHARD_2, SPECIAL_FILE)),
    ("fifo-index", "sharded", fifo(INDEX), (INDEX, SPECIAL_FILE)),
    ("fifo-config", "dense", fifo("config.json"), ("config.json", SPECIAL_FILE)),
    ("fifo-tokenizer", "dense", tokenizer(fifo), ("tokenizer.json", SPECIAL_FILE)),
    ("fifo-stray", "dense", fifo("notes"), ("notes", SPECIAL_FILE)),
    ("fifo-outside-in-index", "sharded", index_to_outside_pipe, ("weight_map.", "not a shard file")),
    (
        "dev-zero-weights",
        "dense",
        link_to("/dev/zero", "model.safetensors"),
        ("model.safetensors", SPECIAL_FILE),
    ),
    ("dev-zero-config", "moe", link_to("/dev/zero", "config.json"), ("config.json", SPECIAL_FILE)),
    ("dev-zero-shard", "sharded", link_to("/dev/zero", SHARD_2), (SHARD_2, SPECIAL_FILE)),
    (
        "dev-zero-tokenizer",
        "dense",
        tokenizer(lambda n: link_to("/dev/zero", n)),
        ("tokenizer.json", SPECIAL_FILE),
    ),
    ("socket-weights", "dense", unix_socket("model.safetensors"), ("model.safetensors", SPECIAL_FILE)),
]


@pytest.mark.parametrize("kind, damage, expect", [pytest.param(*c[1:], id=c[0]) for c in SPECIAL])
def test_special_file_refused_without_opening(tiny_checkpoint, tmp_path, kind, damage, expect):
    """Both commands in a subprocess: a reader that opens a pipe or streams /dev/zero is killed at the
    timeout and the test fails, where in-process it would hang the suite."""
    ckpt = _make(tiny_checkpoint, kind)
    damage(ckpt)
    before = snapshot(tmp_path)
    env = os.environ | {"PYTHONPATH": str(Path(qwen3_compile.__file__).parents[1])}
    for command in ("inspect", "export"):
        start = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "qwen3_compile.cli", *_args(command, ckpt)],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{command}` hung on {expect[0]}")
        output = done.stdout + done.stderr
        _assert_refused(done.returncode, output, expect, time.monotonic() - start)
    assert snapshot(tmp_path) == before


# ---- the race: a file swapped for a pipe after the check ---------------------------------------


def _unblock_later(path: Path) -> threading.Timer:
    """Should a regression block in open() on the pipe, open its write end after SECONDS: the reader
    then sees end-of-file and the test fails on time instead of hanging."""

    def unblock() -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    timer = threading.Timer(SECONDS, unblock)
    timer.daemon = True
    timer.start()
    return timer


def test_open_rechecks_the_opened_file(tmp_path, monkeypatch):
    """The path checked as regular, then a pipe by the time it is opened: O_NONBLOCK keeps open from
    waiting for a writer, fstat refuses it."""
    from qwen3_compile.storage import user_files as files

    regular, pipe = tmp_path / "regular", tmp_path / "model.safetensors"
    regular.write_bytes(b"x")
    os.mkfifo(pipe)
    real_stat = os.stat
    monkeypatch.setattr(files.os, "stat", lambda p, *a, **k: real_stat(regular if p == pipe else p, *a, **k))
    timer, start = _unblock_later(pipe), time.monotonic()
    with pytest.raises(BadInputError, match="named pipe"):
        files.open_regular(pipe, "restore it.")
    timer.cancel()
    assert time.monotonic() - start < SECONDS


def test_shard_reader_refuses_a_shard_swapped_for_a_pipe(tiny_checkpoint):
    """The exporter reopens shards layer by layer: one replaced by a pipe mid-export is refused."""
    from qwen3_compile.models.checkpoint import open_checkpoint
    from qwen3_compile.models.safetensors_index import ShardReader

    ckpt = open_checkpoint(tiny_checkpoint("dense"))
    entry = ckpt.tensors["model.norm.weight"]
    entry.file.unlink()
    os.mkfifo(entry.file)
    timer, start = _unblock_later(entry.file), time.monotonic()
    with pytest.raises(BadInputError, match="named pipe"):
        ShardReader().read_rows(entry, 0, 1)
    timer.cancel()
    assert time.monotonic() - start < SECONDS
