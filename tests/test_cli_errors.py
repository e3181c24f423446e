"""Failures as users and machines see them: exit codes, `--json` error objects on stdout, no tracebacks;
`run --prompt-file` and stdin."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from qwen3_compile.cli import main


def _invoke(args, **kwargs):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kwargs)


@pytest.mark.parametrize(
    "args, field",
    [
        (["export", "no-such-preset", "-o", "{tmp}/out"], "MODEL"),
        (["inspect", "no-such-preset"], "MODEL"),
        (["quantize", "{tmp}", "--recipe", "int8-wo", "-o", "{tmp}/q"], None),
        (["validate", "{tmp}/missing", "--reference", "tiny-dense"], None),
        (["verify-bundle", "{tmp}/missing"], None),
        (["export", "tiny-dense", "--no-such-flag"], None),  # a usage error, raised by Click itself
    ],
)
def test_json_failures_print_an_error_object(tmp_path, args, field):
    result = _invoke([a.replace("{tmp}", str(tmp_path)) for a in args] + ["--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert error["exit_code"] == 2 and error["error"]
    if field:
        assert error["field"] == field
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_exit_2(tmp_path):
    tmp_path.chmod(0o555)
    try:
        result = _invoke(["export", "tiny-dense", "-o", str(tmp_path / "out"), "--json"])
    finally:
        tmp_path.chmod(0o755)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert json.loads(result.stdout)["file"]


def test_os_errors_name_the_file(tmp_path, monkeypatch):
    """A failure to write (a full disk, a read-only folder) is exit 2 naming the file, with --json too."""
    import qwen3_compile.export.stage as export_stage

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "model.onnx"))

    monkeypatch.setattr(export_stage, "export_onnx", full_disk)
    result = _invoke(["export", "tiny-dense", "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert "No space left" in error["error"] and error["file"].endswith("model.onnx")


def test_prompt_file_and_stdin_give_the_same_reply(artifacts, tmp_path):
    exported = str(artifacts.export("tiny-dense"))
    text = "Name three primes. " * 50
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(text, encoding="utf-8")
    common = ["--greedy", "--max-new-tokens", "4", "--no-think", "--json"]
    by_flag = json.loads(_invoke(["run", exported, "-p", text, *common]).stdout)
    by_file = json.loads(_invoke(["run", exported, "--prompt-file", str(prompt), *common]).stdout)
    by_stdin = json.loads(_invoke(["run", exported, "--prompt-file", "-", *common], input=text).stdout)
    assert by_flag["prompt_tokens"] > 100
    for key in ("prompt_tokens", "content", "reasoning"):
        assert by_flag[key] == by_file[key] == by_stdin[key]


@pytest.mark.parametrize(
    "content, words",
    [(b"\xff\xfe not utf-8", "not UTF-8"), (b"  \n", "empty"), (None, "once"), ("fifo", "regular file")],
)
def test_bad_prompt_files(artifacts, tmp_path, content, words):
    exported = str(artifacts.export("tiny-dense"))
    path = tmp_path / "prompt.txt"
    if content == "fifo":
        os.mkfifo(path)
    elif content is not None:
        path.write_bytes(content)
    args = ["run", exported, "--prompt-file", str(path), "--json"]
    if content is None:  # both -p and --prompt-file
        path.write_text("hi")
        args += ["-p", "hi"]
    result = _invoke(args)
    assert result.exit_code == 2 and words in json.loads(result.stdout)["error"]
