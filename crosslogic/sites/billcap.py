"""Monthly bill caps at a site (docs/sites.md, "What holds during a partition"), built like its quotas: the
ledger's month-to-date owed amount as of the last sync (the key's view carries it), plus this site's own spend
the sync does not hold yet (sites/quota.py prices each spooled record with the synced price versions), plus the
maximum cost of the requests in flight here (held from admission until their record is spooled).

A request is refused with the cloud's 403 `billing_cap_reached` when owed + spent + held + its maximum cost
would pass the cap; test keys are exempt (their view has no cap), as in the cloud. The site's spend is priced at
list price without the free tier (the ledger's owed amount is after it): conservative, never under.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from crosslogic import errors
from crosslogic.extauthz.billcap import Cap
from crosslogic.ratelimit.money import month_of
from crosslogic.sites.authz import SiteState
from crosslogic.sites.quota import SiteQuotas
from crosslogic.usage_record import UsageRecord

log = logging.getLogger("crosslogic.sites")
HOLD_TTL_S = 600.0  # a hold whose record never came (the request's log lost) stops counting after this


def site_admits(owed: int, spent: int, held: int, amount: int, cap: int) -> bool:
    """The site's rule: what the ledger owes, what this site spent since, what it holds, and this request's
    maximum cost stay within the cap."""
    return owed + spent + held + amount <= cap


class SiteBillCap:
    """The decision's BillCap protocol (extauthz/decision.py) on synced state; `settled` is the spool's hook."""

    def __init__(self, state: SiteState, quotas: SiteQuotas, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.quotas = quotas
        self.clock = clock
        self.monotonic = monotonic
        self.holds: dict[str, tuple[int, float]] = {}  # request id → (maximum cost, expiry)
        quotas.price = self.price

    def price(self, record: UsageRecord) -> int:
        """What the ledger charges the record before its allowance; a test key's usage is free."""
        if record.key_id in self.state.test_keys:
            return 0
        cost = self.state.prices.cost(record.occurred_at, record.org_id, record.model, record.region,
                                      record.prompt_tokens, record.completion_tokens)
        if cost is None:  # admission refused unpriced requests of a capped org; an uncapped org's cost is moot
            return 0
        return cost

    def held(self) -> int:
        now = self.monotonic()
        for request_id in [r for r, (_, expiry) in self.holds.items() if expiry <= now]:
            del self.holds[request_id]
        return sum(amount for amount, _ in self.holds.values())

    async def reserve(self, org_id: str, cap: Cap | None, model: str, region: str, request_id: str,
                      prompt_tokens: int, completion_tokens: int) -> bool:
        if cap is None or cap.owes_nothing:
            return False
        now = self.clock()
        amount = self.state.prices.cost(now, org_id, model, region, prompt_tokens, completion_tokens)
        if amount is None:  # never hold at a guess: the next sync brings the version
            log.warning("no synced price for %s in %s: refusing a capped org's request", model, region)
            raise errors.service_unavailable()
        month = month_of(now)
        owed = cap.owed_microdollars if cap.month == month else 0  # a new month owes nothing yet
        if not site_admits(owed, self.quotas.spent(org_id, month), self.held(), amount, cap.cap_microdollars):
            raise errors.billing_cap_reached()
        self.holds[request_id] = (amount, self.monotonic() + HOLD_TTL_S)
        return True

    async def release(self, org_id: str, request_id: str) -> None:
        self.holds.pop(request_id, None)

    def settled(self, record: UsageRecord) -> None:
        """The record is spooled (and priced into the site's spend, sites/quota.py): its hold ends."""
        self.holds.pop(record.request_id, None)
