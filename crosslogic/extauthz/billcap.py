"""Monthly bill caps (seed §42), enforced before the fact: ext_authz reserves each request's maximum cost.

The cap applies to what the org owes this month after its allowance (free tier, reserved capacity): the
ledger keeps that in org_monthly_spend.owed_microdollars. At admission, a request of a capped org holds its
maximum cost (prompt estimate and the most completion tokens it may generate, at the price, region
multiplier and org terms in effect now) in Valkey while owed + held < cap (crosslogic/ratelimit/money.py);
the accounting service settles it to the real cost once the row is in the ledger. So spend passes the cap by
at most one reservation, whatever the concurrency and the number of authz replicas.

The cap's terms (cap, fail-closed, owes nothing) and the ledger's owed amount come with the key's tenant view
(extauthz/tenants.py selects CAP_COLUMNS in its one join; a capped org's view is re-read every second in the
background, so `owed` is at most ~1 s old). `owed` is passed to Valkey as a floor (which re-seeds a Valkey that
lost its data). Prices come from a PriceBook reloaded after every crosslogic_prices notification (a request
after the NOTIFY never prices with the old version). When Valkey is unreachable, an org with
bill_cap_fail_closed gets 503; the others fall back to the ledger's month-to-date owed (refused once it reached
the cap: after the fact, as before reservations existed). Orgs that cannot owe anything (reserved capacity
without billed overage) and orgs without a cap cost no Valkey call at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
from prometheus_client import Counter

from crosslogic import errors
from crosslogic.accounting.pricing import PriceBook
from crosslogic.ratelimit.connect import REDIS_UNAVAILABLE
from crosslogic.ratelimit.money import REFUSED, UNKNOWN, MoneyLimiter, month_of

log = logging.getLogger("crosslogic.extauthz")
DEGRADED_LOG_EVERY_S = 10.0

# Over orgs o; the month's spend row s joined by CAP_JOIN (its month is the query's parameter `{month}`).
CAP_COLUMNS = """
o.monthly_bill_cap_microdollars AS cap_microdollars, o.bill_cap_fail_closed AS cap_fail_closed,
(o.billing_plan = 'reserved' AND NOT o.reserved_overage_billed) AS cap_owes_nothing,
COALESCE(s.owed_microdollars, 0) AS cap_owed
"""
CAP_JOIN = ("LEFT JOIN org_monthly_spend s ON o.monthly_bill_cap_microdollars IS NOT NULL AND s.org_id = o.org_id "
            "AND s.month = {month}")
decisions = Counter("crosslogic_billcap_decisions", "Bill-cap admissions of capped orgs' requests",
                    ["outcome"])  # reserved | refused | degraded_admitted | degraded_refused | unavailable


@dataclass(frozen=True, slots=True)
class Cap:
    cap_microdollars: int
    fail_closed: bool
    owed_microdollars: int  # the ledger's, as last read
    owes_nothing: bool
    month: date  # the month `owed_microdollars` is of

    @classmethod
    def from_row(cls, row: Mapping[str, Any], month: date) -> Cap | None:
        """A row holding CAP_COLUMNS; None for an org without a cap."""
        if row["cap_microdollars"] is None:
            return None
        return cls(row["cap_microdollars"], row["cap_fail_closed"], row["cap_owed"], row["cap_owes_nothing"], month)


def cap_reached(owed_microdollars: int, cap_microdollars: int) -> bool:
    """The after-the-fact check (Valkey unreachable): the ledger shows the cap reached."""
    return owed_microdollars >= cap_microdollars


def admits(owed_microdollars: int, held_microdollars: int, cap_microdollars: int) -> bool:
    """money_reserve.lua's rule: a request may start while what is owed and held stays under the cap."""
    return owed_microdollars + held_microdollars < cap_microdollars


class BillCapGuard:
    def __init__(self, pool: asyncpg.Pool, money: MoneyLimiter | None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.pool = pool
        self.money = money  # None: no Valkey (the after-the-fact check only)
        self.clock = clock
        self.book: PriceBook | None = None
        self._book_orgs: frozenset[str] = frozenset()  # the orgs whose terms the book was loaded with
        self._prices_stale = True
        self._loading = asyncio.Lock()
        self._degraded_logged = 0.0

    def prices_changed(self) -> None:
        """A price version was recorded (or the feed reconnected): the next reservation reloads the book first."""
        self._prices_stale = True

    async def _priced_book(self, org_id: str) -> PriceBook | None:
        if self._prices_stale or self.book is None or org_id not in self._book_orgs:
            async with self._loading:
                if self._prices_stale or self.book is None or org_id not in self._book_orgs:
                    orgs = self._book_orgs | {org_id}
                    self._prices_stale = False
                    try:
                        self.book = await PriceBook.load(self.pool, sorted(orgs))
                        self._book_orgs = orgs
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        self._prices_stale = True
                        log.warning("prices not reloaded (%s); using the last known ones", exc)
        return self.book

    async def reserve(self, org_id: str, cap: Cap | None, model: str, region: str, request_id: str,
                      prompt_tokens: int, completion_tokens: int) -> bool:
        """Holds the request's maximum cost for a capped org, or raises 403 billing_cap_reached (or 503).
        True when a reservation is held now: `release` it should the request be refused after all."""
        if cap is None or cap.owes_nothing:
            return False
        now = self.clock()
        book = await self._priced_book(org_id)
        amount = book.cost(now, org_id, model, region, prompt_tokens, completion_tokens) if book else None
        if amount is None:  # a version added a moment ago: never reserve at a guess
            self._prices_stale = True
            book = await self._priced_book(org_id)
            amount = book.cost(now, org_id, model, region, prompt_tokens, completion_tokens) if book else None
            if amount is None:
                decisions.labels("unavailable").inc()
                log.warning("no price for %s in %s for org %s: refusing a capped org's request", model, region, org_id)
                raise errors.service_unavailable()
        month = month_of(now)
        owed = cap.owed_microdollars if cap.month == month else 0  # a new month owes nothing yet
        if self.money is None:
            self._after_the_fact(cap, owed)
            return False
        try:
            decision = await self.money.reserve(org_id, request_id, amount, cap.cap_microdollars, owed, month)
        except REDIS_UNAVAILABLE as exc:
            self._log_degraded(exc)
            self._after_the_fact(cap, owed)
            return False
        if decision.status == UNKNOWN:
            self._after_the_fact(cap, owed)
            return False
        if decision.status == REFUSED:
            decisions.labels("refused").inc()
            raise errors.billing_cap_reached()
        decisions.labels("reserved").inc()
        return True

    def _after_the_fact(self, cap: Cap, owed: int) -> None:
        if cap.fail_closed:
            decisions.labels("unavailable").inc()
            raise errors.service_unavailable()
        if cap_reached(owed, cap.cap_microdollars):
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
        if self.money is None:
            return
        try:
            await self.money.release(org_id, [request_id], month_of(self.clock()))
        except REDIS_UNAVAILABLE as exc:  # its ledger row (a 429) releases it too
            log.debug("bill-cap reservation of %s not released yet (%s)", request_id, exc)
