"""`run`'s library entry: one chat turn with a compiled artifact, streamed or not.

The prompt goes through the real chat template in the chosen reasoning mode (non-thinking prompts end
in the empty think block); the reply is split into reasoning and answer by the `</think>` token id.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen3_compile.backends.registry import DEFAULT_RUNNER_OPTIONS, RunnerOptions
from qwen3_compile.errors import BadInputError
from qwen3_compile.generation.artifact import ChatArtifact, open_chat_artifact
from qwen3_compile.generation.detokenize import ReplyStreamer, StreamPiece
from qwen3_compile.generation.loop import Reply, generate_reply
from qwen3_compile.generation.sampling import Sampler, SamplingConfig, default_sampling
from qwen3_compile.tokenizer import THINK_START_ID, render_chat, split_reasoning


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    thinking: bool = True
    system: str | None = None
    max_new_tokens: int = 512
    sampling: SamplingConfig | None = None  # None: the mode's Qwen3 defaults
    seed: int | None = None  # None: a fresh seed, reported in the result

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class ChatResult:
    request: ChatRequest
    sampling: SamplingConfig
    seed: int
    reply: Reply
    reasoning_ids: list[int]
    content_ids: list[int]
    reasoning: str
    content: str

    def to_dict(self) -> dict:
        reply = self.reply
        rate = reply.tokens_per_s
        return {
            "prompt_tokens": len(reply.prompt_ids),
            "reasoning": self.reasoning,
            "content": self.content,
            "reasoning_ids": self.reasoning_ids,
            "content_ids": self.content_ids,
            "tokens_per_s": round(rate, 2) if rate is not None else None,
            "finish_reason": reply.finish_reason,
            "generated_tokens": len(reply.generated_ids),
            "mode": "thinking" if self.request.thinking else "non-thinking",
            "sampling": self.sampling.to_dict(),
            "seed": None if self.sampling.greedy else self.seed,
            "prefill_s": round(reply.prefill_s, 4),
            "decode_s": round(reply.decode_s, 4),
        }


def _token_budget(artifact: ChatArtifact, prompt_len: int, max_new_tokens: int) -> int:
    limit = artifact.max_positions
    if limit is None:
        return max_new_tokens
    if prompt_len >= limit:
        raise BadInputError(
            f"the rendered prompt has {prompt_len} tokens; the artifact holds {limit} positions.",
            field="--prompt",
            fix="shorten the prompt (and --system), or re-export with a larger --max-positions.",
        )
    return min(max_new_tokens, limit - prompt_len)


def chat(
    artifact: str | ChatArtifact,
    request: ChatRequest,
    on_piece: Callable[[StreamPiece], None] | None = None,
    backend: str | None = None,
    runner_options: RunnerOptions = DEFAULT_RUNNER_OPTIONS,
) -> ChatResult:
    """Render the request, generate with KV-cache reuse, and split the reply by token id.

    `on_piece` receives reasoning and answer text as tokens arrive (complete characters only). `backend`
    (a registry name, e.g. "ort-cuda") runs a folder given by path; default: the one its stage runs on.
    """
    if not isinstance(artifact, ChatArtifact):
        artifact = open_chat_artifact(artifact, backend, runner_options)
    tokenizer = artifact.tokenizer
    prompt_ids = render_chat(tokenizer, request.messages(), request.thinking)
    opened = bool(prompt_ids) and prompt_ids[-1] == THINK_START_ID  # Thinking-2507 templates
    sampling = request.sampling or default_sampling(request.thinking)
    seed = request.seed if request.seed is not None else secrets.randbits(32)
    streamer = ReplyStreamer(tokenizer, prompt_opened_think=opened)

    def on_token(token: int) -> None:
        for piece in streamer.push(token):
            on_piece(piece)

    reply = generate_reply(
        artifact.runner,
        prompt_ids,
        _token_budget(artifact, len(prompt_ids), request.max_new_tokens),
        Sampler(sampling, seed),
        on_token if on_piece is not None else None,
    )
    if on_piece is not None:
        for piece in streamer.flush():
            on_piece(piece)
    parsed = split_reasoning(reply.generated_ids, prompt_opened_think=opened)

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip("\n")

    return ChatResult(
        request,
        sampling,
        seed,
        reply,
        parsed.reasoning_ids,
        parsed.content_ids,
        text(parsed.reasoning_ids),
        text(parsed.content_ids),
    )


MAX_PROMPT_BYTES = 16 * 2**20  # far beyond any context window (262,144 tokens is ~1 MB of text)


def read_prompt_file(path: Path) -> str:
    """A user message from a file, or stdin for '-': UTF-8, at most MAX_PROMPT_BYTES, not empty."""
    import sys

    from qwen3_compile.storage.user_files import decode_text, read_capped, read_text

    too_long = "pass a shorter prompt."
    if str(path) == "-":
        name = "stdin"
        text = decode_text(read_capped(sys.stdin.buffer, MAX_PROMPT_BYTES, name, too_long), name)
    else:
        name = str(path)
        text = read_text(Path(path), MAX_PROMPT_BYTES, "pass an existing text file.", too_long)
    if not text.strip():
        raise BadInputError("is empty.", file=name, fix="write the user message into it.")
    return text
