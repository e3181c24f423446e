"""`qwen3-compile run` as users run it: streamed reasoning apart from the answer, --json, stopping, and
bad input (exit code 2, a message naming the file, the field and the fix)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qwen3_compile.cli import main
from qwen3_compile.tokenizer import IM_END_ID, THINK_END_ID, THINK_START_ID, load_tokenizer, render_chat

REASONING, ANSWER = "用户问好，我来想想…🤔", "你好！答案是 42 ✅🎉"


def invoke(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def thinking_reply(tokenizer) -> list[int]:
    tok = tokenizer
    return (
        [THINK_START_ID]
        + tok.encode(f"\n{REASONING}\n")
        + [THINK_END_ID]
        + tok.encode(f"\n\n{ANSWER}")
        + [IM_END_ID, 11, 12]  # after the stop token: never generated
    )


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_reasoning_on_stderr_answer_on_stdout(scripted_artifact, thinking_reply, stream):
    result = invoke(scripted_artifact(thinking_reply), "--prompt", "你好", stream)
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"
    assert "thinking:" in result.stderr and REASONING in result.stderr
    assert "\ufffd" not in result.output
    assert "tokens/s" in result.stderr and "finish: stop" in result.stderr


def test_json_reply(scripted_artifact, thinking_reply, tokenizer):
    folder = scripted_artifact(thinking_reply)
    result = invoke(folder, "--prompt", "你好", "--system", "Be brief.", "--seed", 3, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    end = thinking_reply.index(THINK_END_ID)
    assert data["reasoning"] == REASONING and data["content"] == ANSWER
    assert data["reasoning_ids"] == thinking_reply[1:end]
    assert data["content_ids"] == thinking_reply[end + 1 : thinking_reply.index(IM_END_ID)]
    assert data["finish_reason"] == "stop" and data["generated_tokens"] == thinking_reply.index(IM_END_ID) + 1
    assert data["sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "greedy": False}
    assert data["seed"] == 3 and data["mode"] == "thinking"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    assert data["prompt_tokens"] == len(render_chat(tokenizer, messages, True))
    assert set(data) >= {"tokens_per_s", "prompt_tokens", "reasoning", "content"}


def test_non_thinking_defaults_and_overrides(scripted_artifact):
    folder = scripted_artifact([11, 12, 13, IM_END_ID])
    data = json.loads(invoke(folder, "-p", "hi", "--no-think", "--json").stdout)
    assert data["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "greedy": False}
    data = json.loads(invoke(folder, "-p", "hi", "--no-think", "--top-k", 5, "--json").stdout)
    assert data["sampling"]["top_k"] == 5 and data["sampling"]["temperature"] == 0.7
    data = json.loads(invoke(folder, "-p", "hi", "--greedy", "--json").stdout)
    assert data["sampling"] == {"greedy": True} and data["seed"] is None


def test_max_new_tokens_and_context_limit(scripted_artifact, tokenizer):
    prompt_len = len(render_chat(tokenizer, [{"role": "user", "content": "hi"}], True))
    data = json.loads(
        invoke(scripted_artifact([11] * 50), "-p", "hi", "--max-new-tokens", 7, "--json").stdout
    )
    assert len(data["content_ids"]) == 7 and data["finish_reason"] == "length"
    # the artifact's max_positions caps generation
    folder = scripted_artifact([11] * 50, max_positions=prompt_len + 3)
    data = json.loads(invoke(folder, "-p", "hi", "--json").stdout)
    assert data["generated_tokens"] == 3 and data["finish_reason"] == "length"
    result = invoke(scripted_artifact([11], max_positions=prompt_len), "-p", "hi")
    assert result.exit_code == 2 and "--max-positions" in result.output


def test_real_artifact_greedy_json(run_presets):
    """The exported tiny-moe runs through the CLI (ONNX Runtime backend), non-thinking prompt."""
    result = invoke(
        run_presets["tiny-moe"][1], "-p", "模型 🚀", "--no-think", "--greedy", "--max-new-tokens", 6, "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["generated_tokens"] <= 6 and data["mode"] == "non-thinking"


def test_real_artifact_sampling_is_seeded(run_presets):
    folder = run_presets["tiny-dense"][1]

    def sample(seed: int) -> list[int]:
        result = invoke(folder, "-p", "写一首诗", "--max-new-tokens", 8, "--seed", seed, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        return data["reasoning_ids"] + data["content_ids"]

    assert sample(5) == sample(5) != sample(6)


def test_real_artifact_streams(run_presets):
    result = invoke(run_presets["tiny-dense"][1], "-p", "hello", "--max-new-tokens", 5, "--seed", 1)
    assert result.exit_code == 0, result.output
    assert "5 generated" in result.stderr and "tokens/s" in result.stderr


def _no_traceback_exit_2(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Fix:" in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_folder_without_manifest(run_presets, tmp_path):
    folder = tmp_path / "no-manifest"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(run_presets["tiny-moe"][1] / "model.onnx")
    result = invoke(folder, "-p", "hi")
    _no_traceback_exit_2(result, str(folder / "manifest.json"), "ARTIFACT", "qwen3-compile export")


def test_folder_without_model(run_presets, tmp_path):
    folder = tmp_path / "no-model"
    folder.mkdir()
    manifest = json.loads((run_presets["tiny-moe"][1] / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = invoke(folder, "-p", "hi")
    _no_traceback_exit_2(result, str(folder / "model.onnx"), "outputs.model.onnx", "re-run")


def test_stage_that_is_not_an_export(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "bundle", "outputs": {}}))
    _no_traceback_exit_2(invoke(tmp_path, "-p", "hi"), "manifest.json", "'stage'", "'bundle'", "export")


def test_artifact_path_problems(run_presets, tmp_path):
    _no_traceback_exit_2(invoke(tmp_path / "missing", "-p", "hi"), "does not exist", "ARTIFACT")
    model = run_presets["tiny-moe"][1] / "model.onnx"
    _no_traceback_exit_2(invoke(model, "-p", "hi"), "is a file", str(model.parent))


def test_bad_options(scripted_artifact):
    folder = scripted_artifact([11, IM_END_ID])
    _no_traceback_exit_2(invoke(folder, "-p", "hi", "--greedy", "--temperature", 0.5), "--temperature")
    assert invoke(folder, "-p", "hi", "--top-p", 0).exit_code == 2
    assert invoke(folder, "-p", "hi", "--temperature", 0).exit_code == 2
    assert invoke(folder).exit_code == 2  # --prompt is required


def test_static_cache_run_gives_the_canonical_reply(artifacts, tmp_path):
    """`run --static-cache N` on tiny-moe lowered with --attention gqa: the greedy reply of the canonical
    export, token for token; --cuda-graph off the CUDA backend, and a static cache on a graph without GQA,
    are refused with exit 2 naming the option."""
    from qwen3_compile.lower.stage import lower_artifact

    export = artifacts.export("tiny-moe")
    gqa = lower_artifact(export, tmp_path / "gqa", "ort", attention="gqa").directory
    common = ["-p", "模型 🚀", "--no-think", "--greedy", "--max-new-tokens", 12, "--json"]
    canonical = invoke(export, *common)
    static = invoke(gqa, *common, "--static-cache", 256)
    assert canonical.exit_code == 0 and static.exit_code == 0, canonical.output + static.output
    expected = json.loads(canonical.stdout)
    assert json.loads(static.stdout)["content_ids"] == expected["content_ids"]
    assert json.loads(static.stdout)["generated_tokens"] == expected["generated_tokens"]

    graph_on_cpu = invoke(gqa, *common, "--static-cache", 256, "--cuda-graph")
    assert graph_on_cpu.exit_code == 2 and "--cuda-graph" in graph_on_cpu.output
    not_gqa = invoke(export, *common, "--static-cache", 256)
    assert not_gqa.exit_code == 2 and "gqa" in not_gqa.output.lower()
