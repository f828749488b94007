"""Settles reservations from the accounting sink's usage records, off the access-log stream.

The sink hands every UsageRecord to `Settler.submit` (non-blocking); a task owned by the accounting
service settles them in Redis. Exactly once per request id is the settle script's job; here we only
decide how many tokens a request really used and keep retrying while Redis is away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from crosslogic.accounting.usage import UsageRecord
from crosslogic.ratelimit import admission
from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.quota import count_usage
from crosslogic.settings import Settings

log = logging.getLogger("crosslogic.ratelimit")
KEEP_RESERVED = -1  # settle script: charge what was reserved


def settled_tokens(record: UsageRecord) -> int:
    """The tokens a request is charged in the limiter, from what Envoy saw.

    Usage reported (complete or cut short by a disconnect): exactly that. No usage at all: if the
    request failed before a node answered (status >= 400 or 0) nothing ran, so everything is refunded;
    otherwise we cannot know and keep the reservation (the ledger row says usage_source 'none').
    """
    if record.usage_source != "none":
        return record.total_tokens
    if record.status_code == 0 or record.status_code >= 400:
        return 0
    return KEEP_RESERVED


class Settler:
    def __init__(self, limiter: Limiter, max_pending: int = 100_000, workers: int = 8) -> None:
        self.limiter = limiter
        self.workers = workers  # settlements are independent: several in flight hide Redis round trips
        self.queue: asyncio.Queue[UsageRecord] = asyncio.Queue(max_pending)
        self.settled = 0

    def submit(self, record: UsageRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:  # the reservation expires on its own; the ledger still has the row
            log.warning("settlement queue full; request %s left to expire", record.request_id)

    async def settle(self, record: UsageRecord) -> bool:
        settled = await admission.settle(self.limiter, record.org_id, record.env_id, record.key_id, record.region,
                                         record.request_id, settled_tokens(record))
        if settled:  # first settlement of this request id: count it against quotas, once
            await count_usage(self.limiter.redis, record.org_id, record.env_id, record.total_tokens,
                              record.occurred_at)
        return settled

    async def run(self) -> None:
        await asyncio.gather(*(self._work() for _ in range(self.workers)))

    async def _work(self) -> None:
        while True:
            record = await self.queue.get()
            while True:
                try:
                    await self.settle(record)
                    self.settled += 1
                    break
                except (OSError, aioredis.RedisError) as exc:
                    log.warning("cannot settle %s yet (%s); retrying", record.request_id, exc)
                    await asyncio.sleep(0.5)


@asynccontextmanager
async def settlement_hook(settings: Settings) -> AsyncIterator[Callable[[UsageRecord], None] | None]:
    """The accounting sink's settlement hook, with its Redis client and task; None without Redis."""
    if not settings.redis_url:
        yield None
        return
    redis = aioredis.from_url(settings.redis_url, socket_connect_timeout=0.5, socket_timeout=2.0)
    settler = Settler(Limiter(redis, reservation_ttl_ms=settings.reservation_ttl_ms))
    task = asyncio.create_task(settler.run())
    try:
        yield settler.submit
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()
