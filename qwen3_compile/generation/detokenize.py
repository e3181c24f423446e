"""Text as tokens arrive: incremental detokenization, and reasoning routed apart from the answer by id.

A byte-level BPE token can end in the middle of a UTF-8 character (a Chinese character or an emoji
often spans two or three tokens), so decoding token by token would print replacement characters.
`IncrementalDetokenizer` holds text back until the decoded tail is a complete character, and it works
for any tokenizer with `decode(ids, skip_special_tokens=...)`: it decodes a short window of recent
tokens and emits what the newest token added to it (the window keeps tokenizers whose pieces depend
on their left neighbour, such as SentencePiece's leading spaces, correct too).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen3_compile.tokenizer import STOP_IDS, THINK_END_ID, THINK_START_ID

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time; `push` returns the text they complete (often "" mid-character).

    The concatenation of everything `push` and `flush` return equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) <= len(emitted) or window.endswith(REPLACEMENT):
            return ""  # nothing new, or an incomplete character at the end: wait for more bytes
        self._prefix, self._read = self._read, len(self.ids)
        return window[len(emitted) :]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end of generation decodes as U+FFFD)."""
        emitted = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return window[len(emitted) :]


@dataclass(frozen=True)
class StreamPiece:
    channel: str  # "reasoning" or "content"
    text: str


class ReplyStreamer:
    """Routes generated tokens to a reasoning or a content stream by the think-token ids, never by text.

    Reasoning starts when the first generated token is `<think>` (or the prompt already opened the
    block, as Thinking-2507 templates do) and ends at `</think>`; everything else is content. Stop
    tokens are not text. Leading newlines of each channel are dropped, as the model card's parsing does.
    (`split_reasoning` parses a finished reply the same way for Qwen3's outputs; it also treats text
    before a `</think>` without an opening tag as reasoning, which a stream cannot take back.)
    """

    def __init__(self, tokenizer, prompt_opened_think: bool = False):
        self._decoders = {name: IncrementalDetokenizer(tokenizer) for name in ("reasoning", "content")}
        self.channel = "reasoning" if prompt_opened_think else "content"
        self._started = {"reasoning": False, "content": False}
        self._first = True

    def _piece(self, channel: str, text: str) -> list[StreamPiece]:
        if not self._started[channel]:
            text = text.lstrip("\n")
            self._started[channel] = bool(text)
        return [StreamPiece(channel, text)] if text else []

    def push(self, token_id: int) -> list[StreamPiece]:
        first, self._first = self._first, False
        if token_id in STOP_IDS:
            return []
        if token_id == THINK_START_ID and first:
            self.channel = "reasoning"
            return []
        if token_id == THINK_END_ID and self.channel == "reasoning":
            pieces = self._piece("reasoning", self._decoders["reasoning"].flush())
            self.channel = "content"
            return pieces
        return self._piece(self.channel, self._decoders[self.channel].push(token_id))

    def flush(self) -> list[StreamPiece]:
        return [p for name, d in self._decoders.items() for p in self._piece(name, d.flush())]
