"""The warm-up benchmark an agent runs before it registers (seed §24.1): the engine's first requests compile and
warm its prefill and decode kernels, and what they measure is the capacity the node reports (the scheduler's
weights scale by it, xds/scoring.py). Through the engine's own OpenAI API, so it works for vLLM and SGLang alike.

* prefill: one request with a long prompt and max_tokens=1: prompt tokens (from the engine's usage) / its time;
* decode: `concurrency` streamed requests at once: tokens generated after each one's first / the wall time from
  the first first-token to the last token. Batched, because a node's capacity is what it decodes for many
  sequences at once, not for one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

MAX_RATE = 4_000_000_000  # uint32 in the registration; an engine with no per-token delay measures "infinite"
PROMPT_WORDS = 512


@dataclass(frozen=True)
class Benchmark:
    prefill_tokens_per_sec: int
    decode_tokens_per_sec: int


def rate(tokens: float, seconds: float) -> int:
    if tokens <= 0:
        return 0
    return MAX_RATE if seconds <= 0 else min(MAX_RATE, round(tokens / seconds))


async def _prefill(session: aiohttp.ClientSession, url: str, model: str, limit: aiohttp.ClientTimeout) -> int:
    prompt = " ".join(f"w{i}" for i in range(PROMPT_WORDS))
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    started = time.monotonic()
    async with session.post(f"{url}/v1/chat/completions", json=body, timeout=limit) as response:
        answer = await response.json(content_type=None)
        response.raise_for_status()
    return rate(answer["usage"]["prompt_tokens"], time.monotonic() - started)


async def _stream(session: aiohttp.ClientSession, url: str, model: str, tokens: int,
                  limit: aiohttp.ClientTimeout) -> tuple[float | None, float | None, int]:
    """(first token at, last token at, completion tokens) of one streamed request."""
    body = {"model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    completion = 0
    async with session.post(f"{url}/v1/chat/completions", json=body, timeout=limit) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"].get("completion_tokens") or completion
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                now = time.monotonic()
                first = first or now
                last = now
    return first, last, completion


async def benchmark(session: aiohttp.ClientSession, engine_url: str, model: str, *, concurrency: int = 4,
                    decode_tokens: int = 32, timeout_s: float = 120.0) -> Benchmark:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    prefill = await _prefill(session, engine_url, model, timeout)
    runs = await asyncio.gather(*(_stream(session, engine_url, model, decode_tokens, timeout)
                                  for _ in range(concurrency)))
    firsts = [f for f, _, _ in runs if f is not None]
    lasts = [last for _, last, _ in runs if last is not None]
    after_first = sum(max(0, n - 1) for _, _, n in runs)
    decode = rate(after_first, max(lasts) - min(firsts)) if firsts and lasts else 0
    return Benchmark(prefill_tokens_per_sec=prefill, decode_tokens_per_sec=decode)
