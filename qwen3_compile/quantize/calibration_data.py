"""Calibration text -> token sequences.

The built-in set (`calibration.jsonl`, written for this project) covers several languages, code, JSON,
tool calls and math; each conversation ends in an assistant reply and is rendered through the chat
template in both reasoning modes: thinking (the reply's reasoning inside `<think>`) and non-thinking
(the empty think block the template writes). A user file is JSONL (`{"messages": [...]}` with optional
`"reasoning"`, `"answer"`, `"tools"`, or `{"text": "..."}`) or plain text (paragraphs separated by
blank lines, used as raw text).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.user_files import parse_json_object, read_text
from qwen3_compile.tokenizer import render_chat

# below this, per-tensor ranges are set by a handful of tokens: refuse rather than calibrate on noise
MIN_TOKENS = 64
_FIX = "write one JSON object per line, or use a .txt file of plain paragraphs."


@dataclass(frozen=True)
class CalibrationSet:
    sequences: list[list[int]]
    source: str

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sequences": len(self.sequences), "tokens": self.tokens}


_EXAMPLE = '{"text": "..."} or {"messages": [{"role": "user", "content": "..."}], "answer": "..."}'
_ROLES = ("system", "user", "assistant", "tool")


def _refuse(path: Path, number: int, key: str, problem: str, fix: str) -> BadInputError:
    return BadInputError(problem, file=path, field=f"line {number}: {key}", fix=fix)


def _check_entry(path: Path, number: int, entry: object) -> dict:
    """One JSONL line's object, its fields checked before anything is tokenized."""
    if not isinstance(entry, dict) or not (
        isinstance(entry.get("messages"), list) or isinstance(entry.get("text"), str)
    ):
        raise _refuse(
            path, number, "messages", 'needs "messages" (a chat list) or "text".', f"write e.g. {_EXAMPLE}."
        )
    if "text" in entry and (
        len(entry) > 1 or not isinstance(entry["text"], str) or not entry["text"].strip()
    ):
        raise _refuse(
            path,
            number,
            "text",
            '"text" must be a non-empty string.',
            f"write e.g. {_EXAMPLE}.",
        )
    for i, message in enumerate(entry.get("messages", [])):
        if not (
            isinstance(message, dict)
            and message.get("role") in _ROLES
            and isinstance(message.get("content"), str)
        ):
            raise _refuse(
                path,
                number,
                f"messages[{i}]",
                "each message needs a role (system, user, assistant or tool) and a string content.",
                'write e.g. {"role": "user", "content": "..."}.',
            )
    if "messages" in entry and not entry["messages"]:
        raise _refuse(path, number, "messages", '"messages" is empty.', "give at least one message.")
    for key in ("answer", "reasoning"):
        if key in entry and not isinstance(entry[key], str):
            raise _refuse(path, number, key, f'"{key}" must be a string.', f'write "{key}": "...".')
    if "tools" in entry and not (
        isinstance(entry["tools"], list) and all(isinstance(t, dict) for t in entry["tools"])
    ):
        raise _refuse(
            path, number, "tools", '"tools" must be a list of tool objects.', 'write "tools": [{...}].'
        )
    return entry


def _entries_from_jsonl(path: Path, text: str) -> list[dict]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = parse_json_object(line.encode(), path, f"line {number}", _FIX)
        except BadInputError as err:
            if "must hold a JSON object" not in err.problem:
                raise BadInputError(err.problem, file=path, field=f"line {number}", fix=err.fix) from None
            entry = None  # a JSON value that is not an object: the field check below says what is needed
        entries.append(_check_entry(path, number, entry))
    return entries


def _render(tokenizer, entry: dict) -> list[list[int]]:
    """One sequence per reasoning mode for a chat entry; one raw sequence for text."""
    if "text" in entry:
        return [list(tokenizer(entry["text"], add_special_tokens=False)["input_ids"])]
    messages, tools = entry["messages"], entry.get("tools")
    if "answer" not in entry:  # a prompt only: calibrate on the prompt as the model will see it
        return [render_chat(tokenizer, messages, thinking=t, tools=tools) for t in (True, False)]
    thinking = {
        "role": "assistant",
        "content": entry["answer"],
        "reasoning_content": entry.get("reasoning", ""),
    }
    plain = {"role": "assistant", "content": entry["answer"]}
    return [
        render_chat(tokenizer, messages + [reply], thinking=t, add_generation_prompt=False, tools=tools)
        for reply, t in ((thinking, True), (plain, False))
    ]


MAX_CALIBRATION_BYTES = 256 << 20  # far more text than `--samples` (at most 4096 sequences) can use


def builtin_calibration_file() -> Path:
    return Path(str(resources.files("qwen3_compile.quantize").joinpath("calibration.jsonl")))


def load_calibration(
    tokenizer, path: str | Path | None = None, samples: int = 32, max_tokens: int = 256
) -> CalibrationSet:
    """At most `samples` sequences of at most `max_tokens` tokens, from `path` or the built-in set."""
    path = Path(path) if path is not None else builtin_calibration_file()
    text = read_text(path, MAX_CALIBRATION_BYTES, "pass an existing file.", "pass a smaller calibration set.")
    if path.suffix == ".jsonl":
        entries = _entries_from_jsonl(path, text)
    else:
        entries = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    sequences = []
    for entry in entries:  # every line was validated above; render only until `samples` are taken
        if len(sequences) >= samples:
            break
        for ids in _render(tokenizer, entry):
            if len(ids) >= 2 and len(sequences) < samples:
                sequences.append(ids[:max_tokens])
    result = CalibrationSet(sequences, str(path))
    if result.tokens < MIN_TOKENS:
        raise BadInputError(
            f"the calibration text gives {result.tokens} tokens in {len(sequences)} sequences; at least "
            f"{MIN_TOKENS} are needed.",
            file=path,
            field="--calibration",
            fix="add more text (a few paragraphs or conversations), or leave out --calibration to use the "
            "built-in calibration set.",
        )
    return result
