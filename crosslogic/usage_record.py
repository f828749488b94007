"""One billable request as the ledger, settlement and billing see it. The ground floor under accounting and
ratelimit (both use it; neither imports the other for it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    occurred_at: datetime
    org_id: str
    env_id: str
    key_id: str
    region: str
    model: str
    endpoint: str
    streamed: bool
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    usage_source: str  # 'reported' | 'partial' (stream cut short) | 'none'
    latency_ms: int
    node: str | None  # internal: upstream address, never shown to tenants

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
