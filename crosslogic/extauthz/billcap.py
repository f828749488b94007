"""Monthly bill caps (seed §42): which orgs have spent their cap this month. Read by ext_authz.

The ledger keeps month-to-date spend per org (org_monthly_spend, updated with every batch), so this is one
small query for the orgs that have a cap, refreshed at most every REFRESH_S; a request never waits on it
except for the first load, and a Postgres outage keeps the last known answer instead of failing requests.
"""

from __future__ import annotations

import logging
import time

import asyncpg

log = logging.getLogger("crosslogic.extauthz")
REFRESH_S = 1.0

CAPPED_ORGS_SQL = """
SELECT o.org_id::text AS org_id, o.monthly_bill_cap_microdollars AS cap, coalesce(s.cost_microdollars, 0) AS spent
FROM orgs o
LEFT JOIN org_monthly_spend s
       ON s.org_id = o.org_id AND s.month = date_trunc('month', now() AT TIME ZONE 'UTC')::date
WHERE o.monthly_bill_cap_microdollars IS NOT NULL
"""


def cap_reached(spent_microdollars: int, cap_microdollars: int) -> bool:
    return spent_microdollars >= cap_microdollars


class BillCaps:
    def __init__(self, pool: asyncpg.Pool, refresh_s: float = REFRESH_S) -> None:
        self.pool = pool
        self.refresh_s = refresh_s
        self.capped: frozenset[str] = frozenset()
        self.loaded_at: float | None = None

    async def _refresh(self) -> None:
        try:
            rows = await self.pool.fetch(CAPPED_ORGS_SQL)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("bill caps not refreshed (%s); using the last known ones", exc)
            self.loaded_at = time.monotonic()
            return
        self.capped = frozenset(r["org_id"] for r in rows if cap_reached(r["spent"], r["cap"]))
        self.loaded_at = time.monotonic()

    async def reached(self, org_id: str) -> bool:
        if self.loaded_at is None or time.monotonic() - self.loaded_at >= self.refresh_s:
            await self._refresh()
        return org_id in self.capped
