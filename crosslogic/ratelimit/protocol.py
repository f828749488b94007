"""Decisions -> what the client sees: OpenAI's x-ratelimit-* headers, retry-after, the 429 body."""

from __future__ import annotations

from crosslogic import errors
from crosslogic.ratelimit.engine import BucketView, Decision

_LAYER_NAMES = {"org": "organization", "env": "environment", "key": "API key"}
_KIND_NAMES = {"tokens_per_sec": "tokens per second", "tokens_per_min": "tokens per minute",
               "requests_per_min": "requests per minute", "tokens_per_day": "tokens per day",
               "concurrency": "concurrent requests"}


def openai_duration(ms: int) -> str:
    """OpenAI's reset format: '20ms', '1s', '6m0s', '1h2m3s'."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = -(-ms // 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _bucket_headers(view: BucketView | None, suffix: str) -> dict[str, str]:
    if view is None:
        return {}
    return {f"x-ratelimit-limit-{suffix}": str(view.capacity),
            f"x-ratelimit-remaining-{suffix}": str(max(0, view.level)),
            f"x-ratelimit-reset-{suffix}": openai_duration(view.reset_ms)}


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    return {**_bucket_headers(decision.tightest("requests_per_min"), "requests"),
            **_bucket_headers(decision.tightest("tokens_per_min"), "tokens")}


def refusal(decision: Decision) -> errors.ClientError:
    if decision.layer in ("global", "region"):  # the platform is saturated: load shedding
        return errors.server_busy(-(-decision.retry_after_ms // 1000))
    return errors.rate_limit_exceeded(_LAYER_NAMES.get(decision.layer or "", decision.layer or ""),
                                      _KIND_NAMES.get(decision.kind or "", decision.kind or ""),
                                      -(-decision.retry_after_ms // 1000))


def refusal_headers(decision: Decision) -> dict[str, str]:
    seconds = max(1, -(-decision.retry_after_ms // 1000))
    return {**ratelimit_headers(decision), "retry-after": str(seconds),
            "retry-after-ms": str(decision.retry_after_ms), "content-type": "application/json"}
