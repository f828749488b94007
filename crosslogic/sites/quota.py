"""Token quotas at a site (docs/sites.md, "What holds during a partition"): the cloud's quota counters as of the last
sync, plus this site's own usage the counters cannot hold yet, against the same Quotas the cloud checks.

A record counts here from the moment it is spooled (`spooled`) until a sync that started after the cloud
acknowledged it (`delivered`, then `begin_sync` / `synced`): the cloud counts a delivered record before it answers
the push (it awaits its settlement), so a sync begun after that holds it and this site stops adding it. A push and
a sync never overlap (`exchange`): a sync overlapping a push could read counters that already hold the batch while
the site, not yet answered, still adds it (counted twice: a request refused before the quota is used up).
This site's own usage is therefore never missed nor counted twice; the exception is a push whose answer was lost
(the cloud counted it, the site sends it again): counted twice, so refused early, never late, until the next sync
after the re-sent batch is answered. What a site cannot see is usage at the cloud's gateways and at other sites
since its last sync: during a partition, the quota can be overshot by that usage (plus, as in the cloud, what was
in flight when the quota was reached).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime

from crosslogic import errors
from crosslogic.ratelimit.money import month_of
from crosslogic.ratelimit.quota import _LEVELS, _PERIODS, Quotas, exceeded, quota_keys
from crosslogic.usage_record import UsageRecord


def spend_key(org_id: str, month: date) -> str:
    """A site-local counter only: the cloud's counters (synced) never hold it; the views' owed amount does."""
    return f"site-spend:{org_id}:{month.isoformat()}"


class SiteQuotas:
    def __init__(self, clock=lambda: datetime.now(UTC)) -> None:
        self.clock = clock
        self.synced: dict[str, int] = {}  # the cloud's counters at the last sync
        self.undelivered: Counter[str] = Counter()  # spooled, not yet acknowledged by the cloud
        self.delivered: Counter[str] = Counter()  # acknowledged, not yet in a sync's counters
        self._in_flight_sync: Counter[str] = Counter()
        # Held by a push from sending its batch to `acknowledged`, and by a sync from `begin_sync` to `synced_counters`.
        self.exchange = asyncio.Lock()
        # A record's cost in micro-dollars, when the site enforces its org's bill cap: then the site's own spend
        # follows the same spooled → delivered → synced path as its tokens (the sync's owed amount holds it after).
        self.price: Callable[[UsageRecord], int] | None = None

    def _counts(self, records: Iterable[UsageRecord]) -> Counter[str]:
        counts: Counter[str] = Counter()
        for r in records:
            if r.total_tokens > 0:
                for key in quota_keys(r.org_id, r.env_id, r.occurred_at):
                    counts[key] += r.total_tokens
                if self.price is not None:  # the bill cap's side of the same record (sites/billcap.py)
                    counts[spend_key(r.org_id, month_of(r.occurred_at))] += self.price(r)
        return counts

    def spooled(self, records: Iterable[UsageRecord]) -> None:
        self.undelivered.update(self._counts(records))

    def acknowledged(self, records: Iterable[UsageRecord]) -> None:
        counts = self._counts(records)
        self.undelivered.subtract(counts)
        self.delivered.update(counts)

    def begin_sync(self) -> None:
        self._in_flight_sync = Counter(self.delivered)  # acknowledged before this sync's request left

    def synced_counters(self, counters: Mapping[str, int]) -> None:
        self.synced = dict(counters)
        self.delivered.subtract(self._in_flight_sync)
        self.delivered = +self.delivered  # drop zeros
        self._in_flight_sync = Counter()

    def used(self, org_id: str, env_id: str) -> list[int]:
        return [self.synced.get(k, 0) + self.undelivered[k] + self.delivered[k]
                for k in quota_keys(org_id, env_id, self.clock())]

    def spent(self, org_id: str, month: date) -> int:
        """This site's own spend of `month` that the last sync's owed amount does not hold yet."""
        key = spend_key(org_id, month)
        return self.undelivered[key] + self.delivered[key]

    async def check(self, org_id: str, env_id: str, quotas: Quotas) -> None:
        if not quotas.any:
            return
        hit = exceeded(quotas, self.used(org_id, env_id))
        if hit is not None:
            raise errors.quota_exceeded(_LEVELS[hit[0]], _PERIODS[hit[1]])


def exchange(quotas: SiteQuotas | None) -> contextlib.AbstractAsyncContextManager:
    """What a push or a sync holds while it runs: the quotas' `exchange` lock, or nothing without quotas."""
    return quotas.exchange if quotas is not None else contextlib.nullcontext()
