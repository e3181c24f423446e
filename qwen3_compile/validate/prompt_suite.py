"""The validation prompt suite: the project's prompts (`prompts.jsonl`) or a user's file, rendered with
the model's chat template in thinking and non-thinking mode, plus a long-context case near the
artifact's maximum positions (RoPE at large positions)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.user_files import read_text
from qwen3_compile.tokenizer import render_chat

MODES = ("thinking", "non-thinking")
# a few hundred tokens of varied prose, repeated to fill a long context
_FILLER = (
    "Chapter {n}. The archive held ledgers from every port of the old trade route: tonnage, tariffs, the "
    "names of ships and the weather on the day they sailed. Numbers such as {n}7, {n}3.5 and 0x{n}F appear "
    "beside notes in Latin, Portuguese and 中文, and a clerk's marginal sums rarely agree with the totals. "
)


@dataclass(frozen=True)
class PromptCase:
    name: str
    category: str
    mode: str
    ids: list[int]


def _parse_line(line: str, number: int, source: str) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInputError(
            f"line {number} is not valid JSON ({err.msg}, column {err.colno}).",
            file=source,
            field=f"line {number}",
            fix="write one JSON object per line (JSONL).",
        ) from None
    if isinstance(entry, str):
        entry = {"messages": [{"role": "user", "content": entry}]}
    if not isinstance(entry, dict) or not isinstance(entry.get("messages", entry.get("prompt")), list | str):
        raise BadInputError(
            f'line {number} needs "messages" (a chat list) or "prompt" (text).',
            file=source,
            field=f"line {number}",
            fix='write e.g. {"messages": [{"role": "user", "content": "..."}]}.',
        )
    if "prompt" in entry:
        entry["messages"] = [{"role": "user", "content": entry["prompt"]}]
    entry.setdefault("name", f"line-{number}")
    entry.setdefault("category", "user")
    return entry


MAX_PROMPTS_BYTES = 64 << 20


def load_prompt_entries(path: str | Path | None = None) -> list[dict]:
    """Entries from a JSONL file (one `{"messages": [...]}`, `{"prompt": "..."}` or string per line)."""
    if path is None:
        text, source = (
            resources.files("qwen3_compile.validate").joinpath("prompts.jsonl").read_text(),
            "prompts.jsonl",
        )
    else:
        try:
            text, source = (
                read_text(
                    Path(path),
                    MAX_PROMPTS_BYTES,
                    "pass an existing JSONL file to --prompts.",
                    "pass a smaller prompt file.",
                ),
                str(path),
            )
        except OSError as err:
            raise BadInputError(
                f"cannot read the prompt file ({err.strerror}).",
                file=path,
                fix="pass an existing JSONL file to --prompts.",
            ) from None
    entries = [_parse_line(line, n, source) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not entries:
        raise BadInputError(
            "the prompt file holds no prompts.", file=source, fix="add one JSON object per line."
        )
    return entries


def render_suite(tokenizer, entries: list[dict]) -> list[PromptCase]:
    cases = []
    for entry in entries:
        for mode in MODES:
            ids = render_chat(
                tokenizer, entry["messages"], thinking=mode == "thinking", tools=entry.get("tools")
            )
            cases.append(PromptCase(entry["name"], entry["category"], mode, ids))
    return cases


def long_context_case(tokenizer, tokens: int) -> PromptCase:
    """A document-QA prompt of about `tokens` tokens (thinking mode)."""
    question = "\n\nIn one sentence: what do the ledgers record?"
    overhead = len(render_chat(tokenizer, [{"role": "user", "content": question}], thinking=True))
    piece, body, n = [], 0, 0
    while body < tokens - overhead:
        chunk = tokenizer.encode(_FILLER.format(n=n))
        piece.extend(chunk)
        body += len(chunk)
        n += 1
    document = tokenizer.decode(piece[: max(tokens - overhead, 1)])
    ids = render_chat(tokenizer, [{"role": "user", "content": document + question}], thinking=True)
    return PromptCase(f"long-context-{len(ids)}", "long-context", "thinking", ids)
