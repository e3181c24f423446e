"""Streaming text: multi-byte characters split across tokens never print as garbage, the stream adds up
to the full decode, and reasoning is routed apart from the answer by token id."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3_compile.generation.detokenize import IncrementalDetokenizer, ReplyStreamer
from qwen3_compile.tokenizer import (
    ENDOFTEXT_ID,
    IM_END_ID,
    THINK_END_ID,
    THINK_START_ID,
    load_tokenizer,
    split_reasoning,
)

TEXTS = [
    "你好，世界！生僻字：龘靐齉爩 鱻 麤 饕餮 魑魅魍魉。",
    "Emoji 🌍🎉👩‍💻🇨🇳 and CJK 日本語テキスト 한국어",
    "naïve café — «quotes» ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🤔✅",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def stream(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    return [*pieces, detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_split_characters_never_print_garbage(tokenizer, text):
    ids = tokenizer.encode(text)
    # the text really splits characters across tokens, so the test checks something
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = stream(tokenizer, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 1  # it streams, not one piece at the end


def test_random_tokens_add_up_to_the_full_decode(tokenizer):
    """Random ids (partial UTF-8 bytes, special tokens, words): the stream equals decode() of all."""
    rng = np.random.default_rng()
    for _ in range(20):
        ids = rng.integers(0, 151669, size=int(rng.integers(1, 60))).tolist()
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_random_mix_of_multibyte_texts(tokenizer):
    rng = np.random.default_rng()
    chars = "".join(TEXTS)
    for _ in range(10):
        text = "".join(rng.choice(list(chars), size=int(rng.integers(1, 40))))
        pieces = stream(tokenizer, tokenizer.encode(text))
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def route(tokenizer, ids: list[int], opened: bool = False) -> dict[str, str]:
    streamer = ReplyStreamer(tokenizer, prompt_opened_think=opened)
    pieces = [p for i in ids for p in streamer.push(i)] + streamer.flush()
    out = {"reasoning": "", "content": ""}
    for piece in pieces:
        out[piece.channel] += piece.text
    return out


def test_reasoning_is_routed_by_token_id(tokenizer):
    reasoning, answer = "让我想想…🤔 the user wrote </think> as text", "答案是 42 ✅"
    # "</think>" written as ordinary tokens ("</", "think>"), not the special id: it stays reasoning text
    text_ids = [
        tokenizer.encode(part) for part in ("\n让我想想…🤔 the user wrote ", "</", "think>", " as text\n")
    ]
    assert THINK_END_ID not in sum(text_ids, [])
    ids = (
        [THINK_START_ID]
        + sum(text_ids, [])
        + [THINK_END_ID]
        + tokenizer.encode("\n\n" + answer)
        + [IM_END_ID]
    )
    got = route(tokenizer, ids)
    assert got == {"reasoning": reasoning + "\n", "content": answer}
    parsed = split_reasoning(ids)  # the finished reply parses the same way
    assert tokenizer.decode(parsed.reasoning_ids).strip("\n") == reasoning
    assert tokenizer.decode(parsed.content_ids).strip("\n") == answer


def test_no_think_block_is_all_content(tokenizer):
    ids = tokenizer.encode("直接回答 🙂") + [ENDOFTEXT_ID]
    assert route(tokenizer, ids) == {"reasoning": "", "content": "直接回答 🙂"}


def test_prompt_that_opened_the_think_block(tokenizer):
    ids = tokenizer.encode("推理") + [THINK_END_ID] + tokenizer.encode("\n\n结论")
    assert route(tokenizer, ids, opened=True) == {"reasoning": "推理", "content": "结论"}


def test_unclosed_reasoning_at_max_tokens(tokenizer):
    ids = [THINK_START_ID] + tokenizer.encode("\n还在想🤔")
    assert route(tokenizer, ids) == {"reasoning": "还在想🤔", "content": ""}
