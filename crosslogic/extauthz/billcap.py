"""Monthly bill caps (seed §42), enforced before the fact: ext_authz reserves each request's maximum cost.

The cap applies to what the org owes this month after its allowance (free tier, reserved capacity): the
ledger keeps that in org_monthly_spend.owed_microdollars. At admission, a request of a capped org holds its
maximum cost (prompt estimate and the most completion tokens it may generate, at the price, region
multiplier and org terms in effect now) in Valkey while owed + held < cap (crosslogic/ratelimit/money.py);
the accounting service settles it to the real cost once the row is in the ledger. So spend passes the cap by
at most one reservation, whatever the concurrency and the number of authz replicas.

Prices come from a PriceBook reloaded on every crosslogic_prices notification (a request after the NOTIFY
never prices with the old version); the caps and the ledger's owed amounts are re-read every REFRESH_S and
passed to Valkey as a floor (which also re-seeds a Valkey that lost its data). When Valkey is unreachable,
an org with bill_cap_fail_closed gets 503; the others fall back to the ledger's month-to-date owed (refused
once it reached the cap: after the fact, as before reservations existed). Orgs that cannot owe anything
(reserved capacity without billed overage) and orgs without a cap cost no Valkey call at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import Counter

from crosslogic import errors
from crosslogic.accounting.pricing import PriceBook
from crosslogic.contract import PRICES_CHANNEL, TENANCY_CHANNEL  # orgs:<id> when an org (its cap) changes
from crosslogic.ratelimit.money import REFUSED, UNKNOWN, MoneyLimiter, month_of
from crosslogic.store.db import follow_notifications

log = logging.getLogger("crosslogic.extauthz")
REFRESH_S = 1.0
DEGRADED_LOG_EVERY_S = 10.0

CAPPED_ORGS_SQL = """
SELECT o.org_id::text AS org_id, o.monthly_bill_cap_microdollars AS cap, o.bill_cap_fail_closed AS fail_closed,
       coalesce(s.owed_microdollars, 0) AS owed,
       (o.billing_plan = 'reserved' AND NOT o.reserved_overage_billed) AS owes_nothing
FROM orgs o
LEFT JOIN org_monthly_spend s ON s.org_id = o.org_id AND s.month = $1
WHERE o.monthly_bill_cap_microdollars IS NOT NULL
"""
decisions = Counter("billcap_decisions_total", "Bill-cap admissions of capped orgs' requests",
                    ["outcome"])  # reserved | refused | degraded_admitted | degraded_refused | unavailable


@dataclass(frozen=True)
class Cap:
    cap_microdollars: int
    fail_closed: bool
    owed_microdollars: int  # the ledger's, as last read
    owes_nothing: bool


def cap_reached(owed_microdollars: int, cap_microdollars: int) -> bool:
    """The after-the-fact check (Valkey unreachable): the ledger shows the cap reached."""
    return owed_microdollars >= cap_microdollars


def admits(owed_microdollars: int, held_microdollars: int, cap_microdollars: int) -> bool:
    """money_reserve.lua's rule: a request may start while what is owed and held stays under the cap."""
    return owed_microdollars + held_microdollars < cap_microdollars


class BillCapGuard:
    def __init__(self, pool: asyncpg.Pool, money: MoneyLimiter | None, refresh_s: float = REFRESH_S,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.pool = pool
        self.money = money  # None: no Valkey (the after-the-fact check only)
        self.refresh_s = refresh_s
        self.clock = clock
        self.caps: dict[str, Cap] = {}
        self.month: date | None = None
        self.loaded_at: float | None = None
        self.book: PriceBook | None = None
        self._prices_stale = True
        self._loading = asyncio.Lock()
        self._degraded_logged = 0.0

    def prices_changed(self) -> None:
        """A price or org changed (or the feed reconnected): the next reservation reloads caps and book first."""
        self._prices_stale = True

    async def _refresh(self, month: date) -> None:
        async with self._loading:
            if not self._due(month):
                return
            try:
                rows = await self.pool.fetch(CAPPED_ORGS_SQL, month)
                caps = {r["org_id"]: Cap(r["cap"], r["fail_closed"], r["owed"], r["owes_nothing"]) for r in rows}
                if self._prices_stale or self.book is None or not set(caps) <= set(self.book.orgs):
                    self._prices_stale = False
                    try:
                        self.book = await PriceBook.load(self.pool, list(caps))
                    except BaseException:
                        self._prices_stale = True
                        raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("bill caps not refreshed (%s); using the last known ones", exc)
                self.loaded_at = time.monotonic()
                return
            self.caps, self.month, self.loaded_at = caps, month, time.monotonic()

    def _due(self, month: date) -> bool:
        return (self.loaded_at is None or self._prices_stale or month != self.month
                or time.monotonic() - self.loaded_at >= self.refresh_s)

    async def reserve(self, org_id: str, model: str, region: str, request_id: str, prompt_tokens: int,
                      completion_tokens: int) -> None:
        """Holds the request's maximum cost for a capped org, or raises 403 billing_cap_reached (or 503)."""
        now = self.clock()
        month = month_of(now)
        if self._due(month):
            await self._refresh(month)
        cap = self.caps.get(org_id)
        if cap is None or cap.owes_nothing:
            return
        amount = self.book.cost(now, org_id, model, region, prompt_tokens, completion_tokens) if self.book else None
        if amount is None:  # a version added a moment ago: never reserve at a guess
            self._prices_stale = True
            await self._refresh(month)
            amount = self.book.cost(now, org_id, model, region, prompt_tokens, completion_tokens) if self.book else None
            if amount is None:
                decisions.labels("unavailable").inc()
                log.warning("no price for %s in %s for org %s: refusing a capped org's request", model, region, org_id)
                raise errors.service_unavailable()
        if self.money is None:
            return self._after_the_fact(cap)
        try:
            decision = await self.money.reserve(org_id, request_id, amount, cap.cap_microdollars,
                                                cap.owed_microdollars, month)
        except (OSError, aioredis.RedisError) as exc:
            self._log_degraded(exc)
            return self._after_the_fact(cap)
        if decision.status == UNKNOWN:
            return self._after_the_fact(cap)
        if decision.status == REFUSED:
            decisions.labels("refused").inc()
            raise errors.billing_cap_reached()
        decisions.labels("reserved").inc()

    def _after_the_fact(self, cap: Cap) -> None:
        if cap.fail_closed:
            decisions.labels("unavailable").inc()
            raise errors.service_unavailable()
        if cap_reached(cap.owed_microdollars, cap.cap_microdollars):
            decisions.labels("degraded_refused").inc()
            raise errors.billing_cap_reached()
        decisions.labels("degraded_admitted").inc()

    def _log_degraded(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._degraded_logged >= DEGRADED_LOG_EVERY_S:
            self._degraded_logged = now
            log.warning("bill-cap reservations unavailable (%s): checking capped orgs against the ledger only "
                        "(fail-closed orgs get 503)", exc)

    async def release(self, org_id: str, request_id: str) -> None:
        """The request was refused after its reservation (rate limit): give the money back now."""
        if self.money is None or org_id not in self.caps:
            return
        try:
            await self.money.release(org_id, [request_id], month_of(self.clock()))
        except (OSError, aioredis.RedisError) as exc:  # its ledger row (a 429) releases it too
            log.debug("bill-cap reservation of %s not released yet (%s)", request_id, exc)


async def follow_price_changes(database_url: str, guard: BillCapGuard) -> None:
    """LISTEN until cancelled: every version insert (crosslogic_prices) and org change (a cap set or raised)
    makes the guard reload before its next reservation."""
    def on_notify(channel: str, payload: str) -> None:
        if channel == PRICES_CHANNEL or payload.startswith("orgs:"):
            guard.prices_changed()

    await follow_notifications(database_url, [PRICES_CHANNEL, TENANCY_CHANNEL], on_notify, guard.prices_changed,
                               "price change feed")
