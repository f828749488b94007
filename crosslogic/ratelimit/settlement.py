"""Settles reservations from the accounting sink's usage records, off the access-log stream.

The sink hands every UsageRecord to `Settler.submit` (non-blocking); a task owned by the accounting
service settles them in Redis. Exactly once per request id is the settle script's job; here we only
decide how many tokens a request really used and keep retrying while Redis is away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from crosslogic.ratelimit.admission import settlement_calls
from crosslogic.ratelimit.connect import REDIS_UNAVAILABLE, redis_client, script_client
from crosslogic.ratelimit.engine import ALREADY_SETTLED, SETTLED, Limiter, limiter_from_settings
from crosslogic.ratelimit.quota import count_usage_many
from crosslogic.ratelimit.resp import ScriptClient
from crosslogic.runtime.health import dependency
from crosslogic.settings import Settings
from crosslogic.usage_record import UsageRecord

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


@dataclass
class BatchProgress:
    """How far one batch's settlement got, so a retry after a Redis fault resumes where it stopped."""

    first: list[int] | None = None  # the first step's statuses (SETTLED / UNRESERVED / ALREADY_SETTLED)
    later_scopes_settled: bool = False
    quotas_counted: bool = False


class Settler:
    """Settles queued records in batches: one pipelined round trip per batch (two with split scopes),
    instead of round trips per request (measured: settlement was the accounting service's largest cost)."""

    def __init__(self, limiter: Limiter, max_pending: int = 100_000, batch_size: int = 256) -> None:
        self.limiter = limiter
        self.batch_size = batch_size
        self.queue: asyncio.Queue[UsageRecord] = asyncio.Queue(max_pending)
        self.settled = 0
        # FIFO: the n-th record queued is settled once `settled` >= n (`queued` counts only what was taken).
        self.queued = 0
        self._progress = asyncio.Condition()

    def submit(self, record: UsageRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:  # the reservation expires on its own; the ledger still has the row
            log.warning("settlement queue full; request %s left to expire", record.request_id)
            return
        self.queued += 1

    async def submit_and_wait(self, records: list[UsageRecord]) -> None:
        """Queues `records` (waiting for room, never dropping one) and returns once they are settled: their
        quota counters hold them. The site API answers a push only then (sites/quota.py relies on it)."""
        for record in records:
            await self.queue.put(record)
            self.queued += 1  # no await between the put and this: the count matches the queue's order
        target = self.queued
        async with self._progress:
            await self._progress.wait_for(lambda: self.settled >= target)

    async def settle_batch(self, records: list[UsageRecord], progress: BatchProgress | None = None) -> list[bool]:
        """Settles every record in each scope it was reserved in; True where it settled now.

        Idempotent per request id (the settle script), so a batch may be retried whole after a fault; pass the
        same `progress` to a retry so it resumes at the step that failed: with split scopes the first step's
        replay answers ALREADY_SETTLED, and a whole retry would then skip the later scopes and the quotas.
        Quota counters take every request the first time it is seen, reserved or not: a request admitted
        fail-open while Redis was down still counts against its quotas.
        """
        progress = progress if progress is not None else BatchProgress()
        amounts = [settled_tokens(r) for r in records]
        calls = [settlement_calls(self.limiter, r.org_id, r.env_id, r.key_id, r.region) for r in records]
        if progress.first is None:
            progress.first = await self.limiter.settle_many(
                [(scopes, r.request_id, a) for r, a, (scopes, _) in zip(records, amounts, calls, strict=True)])
        first = progress.first
        if not progress.later_scopes_settled:
            settled = [(r, a, then) for r, a, (_, then), status in zip(records, amounts, calls, first, strict=True)
                       if status == SETTLED]
            await self.limiter.settle_many([(scopes, r.request_id, a) for r, a, then in settled for scopes in then])
            progress.later_scopes_settled = True
        if not progress.quotas_counted:
            scripts = self.limiter.scripts
            # Quota keys of one org span slots: on a cluster redis-py's client routes them.
            await count_usage_many(scripts if isinstance(scripts, ScriptClient) else self.limiter.redis, [
                (r.org_id, r.env_id, r.total_tokens, r.occurred_at)
                for r, status in zip(records, first, strict=True) if status != ALREADY_SETTLED])
            progress.quotas_counted = True
        return [status == SETTLED for status in first]

    async def settle(self, record: UsageRecord) -> bool:
        return (await self.settle_batch([record]))[0]

    async def run(self) -> None:
        redis = dependency("redis")  # degraded mode of the accounting service: settlements wait for Redis
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            progress = BatchProgress()
            while True:
                try:
                    await self.settle_batch(batch, progress)
                    self.settled += len(batch)
                    redis.succeeded()
                    async with self._progress:
                        self._progress.notify_all()
                    break
                except REDIS_UNAVAILABLE as exc:
                    redis.failed(exc)
                    log.warning("cannot settle %d requests yet (%s); retrying", len(batch), exc)
                    await asyncio.sleep(0.5)


@asynccontextmanager
async def settlement_hook(settings: Settings) -> AsyncIterator[Settler | None]:
    """The accounting sink's settler (`submit` is the settlement hook), with its Redis client and task; None
    without Redis."""
    if not settings.redis_url:
        yield None
        return
    redis = redis_client(settings.redis_url, settings.redis_cluster, connect_timeout=0.5, timeout=2.0)
    # Settlement's batches go through the lean pipelined client (resp.py): in redis-py they were the accounting
    # service's largest cost (bench/profile_stack.py; docs/architecture.md "The access-log path"). On a cluster, one
    # per primary (resp_cluster.py); either way a settlement is answered once its replicas have it (WAIT).
    scripts = script_client(settings.redis_url, settings.redis_cluster, connect_timeout=0.5, timeout=2.0,
                            wait_replicas=settings.redis_wait(), wait_timeout_ms=settings.redis_wait_timeout_ms)
    settler = Settler(limiter_from_settings(redis, settings, scripts))
    task = asyncio.create_task(settler.run())
    try:
        yield settler
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await scripts.aclose()
        await redis.aclose()
