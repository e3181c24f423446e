"""The real Qwen3 tokenizer, chat rendering in both reasoning modes, reasoning split by token id."""

from __future__ import annotations

import shutil

import pytest

from qwen3_compile.tokenizer import (
    EMPTY_THINK_BLOCK,
    IM_END_ID,
    THINK_END_ID,
    THINK_START_ID,
    load_tokenizer,
    packaged_tokenizer_dir,
    render_chat,
    split_reasoning,
    tokenizer_dir_for,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2? Answer in 日本語."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_special_token_ids_match_the_tokenizer(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<think>", "</think>", "<|im_end|>", "<|endoftext|>"])
    assert ids == [THINK_START_ID, THINK_END_ID, IM_END_ID, 151643]
    assert tokenizer.encode("\n\n") == [EMPTY_THINK_BLOCK[1]]


def test_non_thinking_appends_empty_think_block(tokenizer):
    thinking = render_chat(tokenizer, MESSAGES, thinking=True)
    plain = render_chat(tokenizer, MESSAGES, thinking=False)
    assert plain == thinking + [151667, 271, 151668, 271]
    assert THINK_START_ID not in thinking
    text = tokenizer.decode(plain)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_roundtrip_multilingual_text(tokenizer):
    text = "def f(x):\n    return {'ключ': x ** 2}  # 计算"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_split_reasoning_by_token_id(tokenizer):
    reasoning = tokenizer.encode("Let me think: 4.")
    # the text "</think>" spelled with ordinary tokens inside an answer is not the marker
    answer = [*tokenizer.encode("The answer is 4 (not </"), *tokenizer.encode("think> as text).")]
    assert THINK_END_ID not in answer
    generated = [THINK_START_ID, *reasoning, THINK_END_ID, 271, *answer, IM_END_ID]
    parsed = split_reasoning(generated)
    assert parsed.reasoning_closed
    assert tokenizer.decode(parsed.reasoning_ids) == "Let me think: 4."
    assert tokenizer.decode(parsed.content_ids) == "\n\nThe answer is 4 (not </think> as text)."


def test_split_reasoning_open_and_absent():
    assert split_reasoning([THINK_START_ID, 10, 11]).reasoning_closed is False
    assert split_reasoning([THINK_START_ID, 10, 11]).reasoning_ids == [10, 11]
    assert split_reasoning([10, 11, IM_END_ID]).content_ids == [10, 11]
    assert split_reasoning([10, 11], prompt_opened_think=True).reasoning_ids == [10, 11]


def test_checkpoint_tokenizer_preferred(tmp_path, saved_checkpoints):
    ckpt = saved_checkpoints["tiny-dense"]
    assert tokenizer_dir_for(ckpt) == packaged_tokenizer_dir()  # save_pretrained wrote no tokenizer
    for f in packaged_tokenizer_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    assert tokenizer_dir_for(tmp_path) == tmp_path
    assert load_tokenizer(tmp_path).encode("hello") == load_tokenizer().encode("hello")
