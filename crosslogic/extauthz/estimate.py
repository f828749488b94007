"""Prompt-token estimate for reservations, without a tokenizer (it runs on every request, so it stays a
single walk over the already-parsed body).

The reservation is `estimate + max_tokens`; settlement corrects it to the node's real count, so an
overestimate only holds bucket capacity until the request ends, while an underestimate lets concurrent
requests overshoot a limit. So the estimate leans high, and it is never below the estimate it replaced
(every string's characters / 4, + 1), which the property tests check.

Text is measured in quarter tokens ("units"):
- an ASCII character is 1 unit: English averages ~4 characters per token in the Llama-3 and OpenAI BPEs;
- every UTF-8 byte beyond the first of a character adds 2 units: accented Latin costs 3/4 of a token per
  character, CJK 1.25 and emoji 1.75, close to what byte-level BPEs spend on them (a plain chars/4 would
  count Chinese text 4-5 times too low);
- a token id (an int in a list, the tokenized form of a prompt) is exactly one token, 4 units.
Every string in a message counts (role, text parts, names, tool-call names and arguments, ids, and for
non-text parts whatever they carry, e.g. an image URL), as the old estimate did; dict keys do not, as chat
templates do not render them. Tool and function definitions are rendered into the prompt as JSON by the
chat templates, so they count as their JSON text.

Template overhead is added in whole tokens: the constants below, each the larger of what Llama-3's chat
template adds and what OpenAI publishes for its own models.
"""

from __future__ import annotations

import json
import re

# Llama-3 wraps every message as <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>: 4 tokens
# besides the role, whose text is counted above. OpenAI's cookbook (num_tokens_from_messages) counts 3.
MESSAGE_OVERHEAD = 4
# OpenAI's cookbook: a message's `name` costs 1 token beyond its text (tokens_per_name).
NAME_OVERHEAD = 1
# Once per conversation: Llama-3's <|begin_of_text|> and the generation prompt
# <|start_header_id|>assistant<|end_header_id|>\n\n (5 tokens); OpenAI primes every reply with 3.
REPLY_OVERHEAD = 5
# An assistant tool call is rendered as {"name": ..., "parameters": ...} (Llama-3.1): the keys, quotes and
# braces around the name and arguments text are ~10 tokens.
TOOL_CALL_OVERHEAD = 10
# With tools, Llama-3.1's template adds "Environment: ipython" and the instruction "Given the following
# functions, please respond with a JSON for a function call ... Do not use variables." (~75 tokens).
TOOLS_OVERHEAD = 80
UNITS_PER_TOKEN = 4


def text_units(text: str) -> int:
    if text.isascii():  # the common case, checked in C without encoding
        return len(text)
    return len(text) + 2 * (len(text.encode("utf-8", "surrogatepass")) - len(text))


def value_units(value: object) -> int:
    """Units of every string in a JSON value (and of token ids in lists); the old estimate's walk.

    Iterative, with an explicit stack: the body's depth is bounded before parsing (jsonbody.py), but an
    estimate must never be the thing that recurses once per level."""
    units, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            units += text_units(item)
        elif isinstance(item, list):
            for v in item:
                if _is_token_id(v):
                    units += UNITS_PER_TOKEN
                else:
                    stack.append(v)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return units


# What json.dumps(..., ensure_ascii=False) adds to a string besides its characters: quotes, and escapes.
_CONTROL = re.compile(r"[\x00-\x1f]")
_SHORT_ESCAPES = frozenset("\n\r\t\b\f")


def _string_json_units(text: str) -> int:
    units = text_units(text) + 2 + text.count('"') + text.count("\\")
    for c in _CONTROL.findall(text):
        units += 1 if c in _SHORT_ESCAPES else 5  # \n, or \u00XX
    return units


def _scalar_json_units(value: object) -> int:
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if isinstance(value, float):
        return len(json.dumps(value))  # repr, or Infinity / NaN
    if isinstance(value, int):
        try:
            return len(str(value))
        except ValueError:  # beyond Python's int-to-text limit; jsonbody refuses such numbers anyway
            return value.bit_length() * 3 // 10 + 2
    return 0


def json_units(value: object) -> int:
    """Units of `value` as json.dumps(value, ensure_ascii=False) writes it (default separators), computed
    without writing it and without recursion (json.dumps recurses once per level)."""
    units, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            units += _string_json_units(item)
        elif isinstance(item, list):
            units += 2 + 2 * max(0, len(item) - 1)  # [] and ", "
            stack.extend(item)
        elif isinstance(item, dict):
            units += 2 + 2 * max(0, len(item) - 1) + 2 * len(item)  # {}, ", " and ": "
            for key, v in item.items():
                units += _string_json_units(key)
                stack.append(v)
        else:
            units += _scalar_json_units(item)
    return units


def _is_token_id(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _message_overhead(message: dict) -> int:
    overhead = MESSAGE_OVERHEAD
    if message.get("name"):
        overhead += NAME_OVERHEAD
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        overhead += TOOL_CALL_OVERHEAD * len(calls)
    if message.get("function_call"):  # the deprecated single-call form
        overhead += TOOL_CALL_OVERHEAD
    return overhead


def chat_prompt_tokens(messages: object, body: dict) -> int:
    """Estimated prompt tokens of a chat request: its messages through the chat template, plus the tool
    (or deprecated function) definitions the template renders into the prompt. Total on any JSON (entries
    that are not objects count only their strings): validation runs first, but an estimate never raises."""
    units = value_units(messages)
    entries = messages if isinstance(messages, list) else []
    overhead = REPLY_OVERHEAD + sum(_message_overhead(m) for m in entries if isinstance(m, dict))
    definitions = [d for d in (body.get("tools"), body.get("functions")) if d]
    if definitions:
        try:  # json.dumps is C and ~3x faster; it recurses, so a deep value (only from a direct caller:
            # request bodies are depth-bounded) is measured by the iterative json_units instead
            units += text_units(json.dumps(definitions, ensure_ascii=False))
        except RecursionError:
            units += json_units(definitions)
        overhead += TOOLS_OVERHEAD
    return units // UNITS_PER_TOKEN + overhead


def prompt_count(prompt: object) -> int:
    """How many prompts a completions `prompt` / embeddings `input` holds: a string or a list of token
    ids is one, a list of strings or of token-id lists is one per element."""
    if isinstance(prompt, list) and prompt and not all(_is_token_id(p) for p in prompt):
        return len(prompt)
    return 1


def text_prompt_tokens(prompt: object) -> int:
    """Estimated prompt tokens of a completions `prompt` or embeddings `input`: one BOS token per prompt."""
    return value_units(prompt) // UNITS_PER_TOKEN + prompt_count(prompt)
