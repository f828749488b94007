"""The bill cap's two phases in Valkey: reserve a request's maximum cost at admission, settle when the ledger
has the row (money_reserve.lua, money_settle.lua).

Per org and UTC month, in the org's hash slot (`{o:<org_id>}`, with its limiter keys):
  …:money:<YYYYMM>       c = what the org owes this month (the ledger's org_monthly_spend.owed_microdollars),
                         h = the sum of the reservations held
  …:money:<YYYYMM>:held  request id -> reserved micro-dollars;  …:money:<YYYYMM>:exp  request id -> expiry
A request is admitted while c + h < cap, then holds its maximum cost; once its row is in the ledger, the
accounting service raises c to the ledger's value (read after the commit) and drops the reservation in one
script call. So c + h never undercounts what is owed, and spend passes the cap by at most one reservation.
`c` only comes from Postgres: ledger settlements, and the floor ext_authz passes with every reservation
(its last read of org_monthly_spend), which also re-seeds a Valkey that lost its data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from crosslogic.ratelimit.connect import REDIS_UNAVAILABLE, redis_client
from crosslogic.ratelimit.engine import DEFAULT_RESERVATION_TTL_MS, Clock, org_tag, tenant_scope, wall_clock_ms
from crosslogic.ratelimit.lua import LuaScript, cluster_calls, on_cluster
from crosslogic.settings import Settings

if TYPE_CHECKING:  # a type only: the limiter's processes (ext_authz) do not load the ledger and its metrics
    from crosslogic.accounting.ledger import MonthlyOwed

log = logging.getLogger("crosslogic.ratelimit")
REFUSED, RESERVED, REPEATED, ENDED, UNKNOWN = 0, 1, 2, 3, 4  # money_reserve.lua's statuses
KEEP_DAYS_AFTER_MONTH = 7  # a month's keys outlive it a little: late rows of its last requests settle there


def _script(name: str) -> LuaScript:
    return LuaScript((resources.files("crosslogic.ratelimit") / "scripts" / name).read_text())


def month_of(at: datetime) -> date:
    """The UTC month a moment belongs to (as org_monthly_spend.month)."""
    utc = at.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def money_keys(org_id: str, month: date) -> list[str]:
    base = f"{org_tag(org_id)}:money:{month:%Y%m}"
    return [base, f"{base}:held", f"{base}:exp"]


def keys_expire_at_ms(month: date) -> int:
    following = (month.replace(day=28) + timedelta(days=4)).replace(day=1)
    end = datetime(following.year, following.month, 1, tzinfo=UTC) + timedelta(days=KEEP_DAYS_AFTER_MONTH)
    return int(end.timestamp() * 1000)


@dataclass(frozen=True)
class MoneyDecision:
    status: int
    owed_microdollars: int = 0
    held_microdollars: int = 0

    @property
    def admitted(self) -> bool:
        return self.status in (RESERVED, REPEATED, ENDED)


class MoneyLimiter:
    def __init__(self, redis: aioredis.Redis, reservation_ttl_ms: int = DEFAULT_RESERVATION_TTL_MS,
                 clock: Clock = wall_clock_ms) -> None:
        self.redis = redis
        self.reservation_ttl_ms = reservation_ttl_ms
        self.clock = clock
        self._reserve = _script("money_reserve.lua")
        self._settle = _script("money_settle.lua")

    async def reserve(self, org_id: str, request_id: str, amount_microdollars: int, cap_microdollars: int,
                      owed_floor: int | None, month: date) -> MoneyDecision:
        """Holds `amount` for the request if the org's month is still under its cap (owed + held < cap)."""
        keys = [*money_keys(org_id, month), tenant_scope(org_id, "", "").keys(request_id)[0]]
        args = [self.clock(), request_id, max(0, amount_microdollars), cap_microdollars,
                -1 if owed_floor is None else owed_floor, self.reservation_ttl_ms, keys_expire_at_ms(month)]
        status, owed, held = (int(v) for v in await self._reserve(self.redis, keys, args))
        return MoneyDecision(status, owed, held)

    async def release(self, org_id: str, request_ids: Sequence[str], month: date) -> int:
        """Drops reservations without settling anything (the request was refused after its reservation)."""
        return int(await self._settle(self.redis, money_keys(org_id, month),
                                      [-1, keys_expire_at_ms(month), *request_ids]))

    async def settle_many(self, owed: Sequence[MonthlyOwed]) -> int:
        """The ledger committed these rows: one pipelined round trip; returns the reservations released."""
        if not owed:
            return 0
        if on_cluster(self.redis):
            calls = [(money_keys(o.org_id, o.month), [o.owed_microdollars, keys_expire_at_ms(o.month), *o.request_ids])
                     for o in owed]
            return sum(int(n) for n in await cluster_calls(self.redis, self._settle, calls))
        for attempt in range(2):
            sha = await self._settle.load(self.redis, again=attempt > 0)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for o in owed:
                        keys = money_keys(o.org_id, o.month)
                        pipe.evalsha(sha, len(keys), *keys, o.owed_microdollars, keys_expire_at_ms(o.month),
                                     *o.request_ids)
                    return sum(int(n) for n in await pipe.execute())
            except NoScriptError:  # Valkey restarted without its script cache; settling twice is a no-op
                if attempt:
                    raise
        raise AssertionError("unreachable")


class MoneySettler:
    """The accounting service's bill-cap settlement: queued after each ledger commit, retried while Valkey
    is away (idempotent: absolute owed values, releases by request id)."""

    def __init__(self, money: MoneyLimiter, max_pending: int = 100_000) -> None:
        self.money = money
        self.queue: asyncio.Queue[MonthlyOwed] = asyncio.Queue(max_pending)
        self.released = 0

    def submit(self, owed: list[MonthlyOwed]) -> None:
        for item in owed:
            try:
                self.queue.put_nowait(item)
            except asyncio.QueueFull:  # the reservations expire; ext_authz's floor brings the owed value
                log.warning("bill-cap settlement queue full; %d reservations left to expire", len(item.request_ids))

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < 256 and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            while True:
                try:
                    self.released += await self.money.settle_many(batch)
                    break
                except REDIS_UNAVAILABLE as exc:
                    log.warning("cannot settle bill-cap reservations yet (%s); retrying", exc)
                    await asyncio.sleep(0.5)


@asynccontextmanager
async def money_settlement(settings: Settings) -> AsyncIterator[Callable[[list[MonthlyOwed]], None] | None]:
    """The ledger's bill-cap settlement hook, with its Redis client and task; None without Redis."""
    if not settings.redis_url:
        yield None
        return
    redis = redis_client(settings.redis_url, settings.redis_cluster, connect_timeout=0.5, timeout=2.0)
    settler = MoneySettler(MoneyLimiter(redis, settings.reservation_ttl_ms))
    task = asyncio.create_task(settler.run())
    try:
        yield settler.submit
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()
