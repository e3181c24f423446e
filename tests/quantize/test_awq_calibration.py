"""AWQ's search objective against an independent reference, and `quantize --calibration FILE`: a user's
calibration text is what calibration uses; bad files are refused with exit 2 before anything is written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.numpy import load_file

from qwen3_compile.cli import main
from qwen3_compile.models.config import Qwen3Arch
from qwen3_compile.quantize.awq import AwqSearch
from qwen3_compile.quantize.calibrate import calibrate
from qwen3_compile.quantize.calibration_data import load_calibration
from qwen3_compile.tokenizer import load_tokenizer

from .test_int4 import reference_int4

GROUP, GRID = 32, 5


def _fake_int4(w: np.ndarray) -> np.ndarray:
    q, scale = reference_int4(w, GROUP)
    return (q.reshape(*w.shape[:-1], -1, GROUP) * scale[..., None].astype(np.float64)).reshape(w.shape)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


@pytest.mark.slow  # a calibration with AWQ search of tiny-dense
def test_awq_mlp_scales_minimise_the_mlp_output_error(artifacts):
    """The gate/up scales are chosen for the least error of the MLP's output (AWQ's module2inspect), computed
    here in numpy: down(silu(x G^T) * (x U^T)), G and U quantized as (Q(W s) / s), down float; the search's
    alpha is the argmin of that error over its grid and its recorded losses are that error."""
    export = artifacts.export("tiny-dense")
    arch = Qwen3Arch.from_config_file(export / "config.json")
    weights = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(export / "model.onnx")).graph.initializer
    }
    search, kept = AwqSearch(arch, grid=GRID, group=GROUP, max_tokens=1 << 20), {}

    def on_layer(index, layer, stats):
        kept[index] = np.concatenate([x.double().numpy() for x in stats.samples["mlp_in"]])
        search(index, layer, stats)

    calibrate(
        arch,
        weights.__getitem__,
        load_calibration(load_tokenizer(export), samples=4, max_tokens=48),
        on_layer=on_layer,
    )
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        x = kept[layer]  # [N, H]
        s_down = search.scales[p + "down"]
        gate = weights[p + "mlp.gate_proj.weight.T"].T.astype(np.float64)
        up = weights[p + "mlp.up_proj.weight.T"].T.astype(np.float64) / s_down[:, None]
        down = weights[p + "mlp.down_proj.weight.T"].T.astype(np.float64) * s_down
        want = (_silu(x @ gate.T) * (x @ up.T)) @ down.T
        mean_abs = np.abs(x).mean(axis=0)
        losses = []
        for alpha in np.arange(GRID) / GRID:
            s = np.maximum(mean_abs, 1e-4) ** alpha
            s = s / np.sqrt(s.max() * s.min())
            g, u = _fake_int4(gate * s) / s, _fake_int4(up * s) / s
            losses.append(float(np.square((_silu(x @ g.T) * (x @ u.T)) @ down.T - want).sum()))
        info = search.summary[p + "mlp"]
        assert info["alpha"] == np.argmin(losses) / GRID, (layer, losses, info)
        assert info["loss"] == pytest.approx(min(losses), rel=1e-4)
        assert info["rtn_loss"] == pytest.approx(losses[0], rel=1e-4)


BAD = {  # name: (file contents, words the message holds)
    "empty.jsonl": (b"", "0 tokens"),
    "empty.txt": (b"\n\n", "0 tokens"),
    "latin1.txt": ("caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
    "message-number.jsonl": (b'{"messages": [3]}\n', "messages[0]"),
    "no-role.jsonl": (b'{"messages": [{"content": "hi"}]}\n', "messages[0]"),
    "answer-number.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}], "answer": 3}\n', "answer"),
    "tools-string.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}], "tools": "x"}\n', "tools"),
    "blank-text.jsonl": (b'{"text": "   "}\n', "text"),
    "second-line.jsonl": (b'{"text": "hello there"}\n{"text": \n', "line 2"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_calibration_file_exits_2(artifacts, tmp_path, name):
    content, words = BAD[name]
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    args = ["quantize", str(artifacts.export("tiny-dense")), "--recipe", "int4-awq", "--group-size", "32"]
    result = CliRunner().invoke(main, args + ["--calibration", str(path), "-o", str(out), "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert words in error["error"] and name in error["error"] and "Fix:" in error["error"], error
    assert not out.exists()


@pytest.mark.slow  # two int4-awq quantizations
def test_calibration_file_is_what_awq_calibrates_on(artifacts, tmp_path):
    """`--calibration` (and its short form `--calib`) replaces the built-in set: the manifest names the file
    and its token count, and AWQ's scales differ from the built-in set's."""
    code = tmp_path / "code.txt"
    code.write_text(
        "\n\n".join(
            f"def f{i}(x, y):\n    total = 0\n    for k in range({i}, x):\n        total += k * y\n"
            "    return total"
            for i in range(6)
        )
    )
    export, scales = str(artifacts.export("tiny-dense")), {}
    for flag, calib in (("--calibration", code), (None, None)):
        out = tmp_path / (flag or "builtin")
        args = [
            "quantize",
            export,
            "--recipe",
            "int4-awq",
            "--group-size",
            "32",
            "--samples",
            "6",
            "-o",
            str(out),
        ]
        result = CliRunner().invoke(main, args + ([flag, str(calib)] if flag else []) + ["--json"])
        assert result.exit_code == 0, result.output
        calibration = json.loads(result.stdout)["calibration"]
        scales[flag] = load_file(str(out / "calibration.safetensors"))
        if flag:
            expected = load_calibration(load_tokenizer(), code, samples=6, max_tokens=256)
            assert calibration["source"] == str(code) and calibration["tokens"] == expected.tokens
    key = "awq/model.layers.0.attn"
    assert not np.allclose(scales["--calibration"][key], scales[None][key])


def test_a_layer_replaced_by_on_layer_feeds_the_next_layer(artifacts):
    """calibrate's sequential protocol: an `on_layer` that changes the layer's weights and returns True makes
    the next layer read the changed layer's output (the same ranges as calibrating a checkpoint with those
    weights); returning False keeps the float output."""
    export = artifacts.export("tiny-dense")
    arch = Qwen3Arch.from_config_file(export / "config.json")
    weights = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(export / "model.onnx")).graph.initializer
    }
    texts = load_calibration(load_tokenizer(export), samples=2, max_tokens=48)
    silenced = ("model.layers.0.self_attn.o_proj.weight.T", "model.layers.0.mlp.down_proj.weight.T")

    def silence_layer_0(replace: bool):
        def on_layer(index, layer, stats):
            if index == 0:  # layer 0 then adds nothing to the residual stream
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            return replace

        return calibrate(arch, weights.__getitem__, texts, on_layer=on_layer)

    plain = calibrate(arch, weights.__getitem__, texts)
    zeroed = calibrate(arch, lambda n: weights[n] * 0 if n in silenced else weights[n], texts)
    reader = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(silence_layer_0(False).act_amax(reader), plain.act_amax(reader))
    np.testing.assert_allclose(silence_layer_0(True).act_amax(reader), zeroed.act_amax(reader), rtol=1e-6)
    assert not np.allclose(zeroed.act_amax(reader), plain.act_amax(reader))
