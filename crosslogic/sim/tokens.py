"""Deterministic token arithmetic for the vLLM simulator.

The simulator has no tokenizer, so token counts follow fixed rules that tests can compute exactly:

* A text prompt costs one token per whitespace-separated word (``str.split()``), and at least one token,
  standing in for the BOS token a real tokenizer adds: ``""`` and ``"   "`` cost 1, ``"a b"`` costs 2.
* A prompt given as token ids costs one token per id.
* A chat prompt costs, per message, the words of its text content plus 4 (role and template markers),
  plus 2 for the whole conversation (the generation prompt). Content may be a string, a list of parts
  (only ``{"type": "text"}`` parts count) or absent/null (0 words).
* Generated token ``i`` (0-based) is the word ``tok{i}``, followed by a space except for the last one, so
  the text of ``n`` generated tokens is ``"tok0 tok1 ... tok{n-1}"`` and costs ``n`` tokens when fed back.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_PER_CONVERSATION = 2


def count_words(text: str) -> int:
    return len(text.split())


def count_prompt_tokens(text: str) -> int:
    """Tokens of one text prompt: its word count, at least 1 (the BOS token)."""
    return max(1, count_words(text))


def _content_words(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_words(content)
    if isinstance(content, list):
        return sum(
            count_words(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return 0


def chat_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Tokens of a chat conversation after the (simulated) chat template."""
    return (
        sum(_content_words(m.get("content")) + CHAT_TOKENS_PER_MESSAGE for m in messages)
        + CHAT_TOKENS_PER_CONVERSATION
    )


def prompt_batch(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """Split a completions ``prompt`` / embeddings ``input`` into its individual prompts.

    A string is one prompt, a list of ints is one tokenized prompt; a list of strings or of int lists
    is one prompt per element (vLLM answers each with its own choice / embedding).
    """
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)


def tokens_of(prompt: str | list[int]) -> int:
    return count_prompt_tokens(prompt) if isinstance(prompt, str) else len(prompt)


def batch_prompt_tokens(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """Total prompt tokens of a completions ``prompt`` or embeddings ``input``, any accepted form."""
    return sum(tokens_of(p) for p in prompt_batch(prompt))


def completion_tokens_for(max_tokens: int | None, default: int) -> int:
    """The simulated model writes exactly ``max_tokens`` tokens when asked, else ``default``."""
    return max_tokens if max_tokens is not None else default


@dataclass(frozen=True)
class CompletionPlan:
    tokens: int
    finish_reason: str  # "length" when a limit cut the output, "stop" when the model ended by itself


def plan_completion(
    prompt_tokens: int, max_tokens: int | None, default: int, max_model_len: int
) -> CompletionPlan:
    """How many tokens one sequence generates, clamped to the context window as vLLM does.

    With ``max_tokens`` the output fills it ("length"); without, the model stops by itself after
    ``default`` tokens ("stop"), unless the context window (``max_model_len - prompt_tokens``) is
    reached first ("length").
    """
    room = max_model_len - prompt_tokens
    wanted = completion_tokens_for(max_tokens, default)
    if wanted >= room:
        return CompletionPlan(room, "length")
    return CompletionPlan(wanted, "length" if max_tokens is not None else "stop")


def token_text(i: int, total: int) -> str:
    """Text of generated token ``i`` out of ``total``."""
    return f"tok{i}" if i == total - 1 else f"tok{i} "


def generated_text(n: int) -> str:
    return "".join(token_text(i, n) for i in range(n))


def embedding_for(prompt: str | list[int], dim: int) -> list[float]:
    """A unit-length vector that depends only on the input (text or token ids) and ``dim``."""
    key = prompt.encode() if isinstance(prompt, str) else b"ids:" + ",".join(map(str, prompt)).encode()
    raw: list[float] = []
    counter = 0
    while len(raw) < dim:
        block = hashlib.sha256(key + struct.pack("<I", counter)).digest()
        raw.extend(v / 2**31 for v in struct.unpack("<8i", block))
        counter += 1
    raw = raw[:dim]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]
