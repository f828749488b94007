"""Cost guardrails (seed §42) run by the accounting service: alerts before the bill cap, auto-suspend at it.

ext_authz refuses requests of an org over its cap by itself (crosslogic/extauthz/billcap.py); this loop
adds the slower consequences: an alert once per threshold and month, and, for orgs that asked for it,
suspension (the tenancy NOTIFY trigger tells every authz replica at once). Like the cap, it counts what the
org owes after its monthly allowance (org_monthly_spend.owed_microdollars).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from prometheus_client import Counter

log = logging.getLogger("crosslogic.accounting.guardrails")
ALERT_THRESHOLDS_PCT = (80, 100)
cap_alerts = Counter("crosslogic_billing_cap_alerts", "Bill cap alerts raised", ["threshold_pct"])
cap_suspensions = Counter("crosslogic_billing_cap_suspensions", "Orgs suspended on reaching their bill cap")

_SPEND_SQL = """
SELECT o.org_id, o.name, o.status, o.suspend_at_cap, o.monthly_bill_cap_microdollars AS cap,
       coalesce(s.owed_microdollars, 0) AS spent, date_trunc('month', now() AT TIME ZONE 'UTC')::date AS month
FROM orgs o
LEFT JOIN org_monthly_spend s
       ON s.org_id = o.org_id AND s.month = date_trunc('month', now() AT TIME ZONE 'UTC')::date
WHERE o.monthly_bill_cap_microdollars IS NOT NULL
"""
_ALERT_SQL = """
INSERT INTO billing_alerts (org_id, month, threshold_pct) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING RETURNING threshold_pct
"""
_SUSPEND_SQL = "UPDATE orgs SET status = 'suspended' WHERE org_id = $1 AND status = 'active' RETURNING org_id"
_AUDIT_SQL = """
INSERT INTO audit_log (actor, action, target_type, target_id, details)
VALUES ('billing', 'org.suspend', 'org', $1, $2::jsonb)
"""


def thresholds_crossed(spent: int, cap: int) -> list[int]:
    """Alert thresholds (percent of the cap) that `spent` has reached. Integer maths only."""
    return [pct for pct in ALERT_THRESHOLDS_PCT if spent * 100 >= cap * pct]


async def check_caps(conn: asyncpg.Connection) -> list[str]:
    """One pass; returns what it did (for logs and tests)."""
    actions = []
    for row in await conn.fetch(_SPEND_SQL):
        for pct in thresholds_crossed(row["spent"], row["cap"]):
            if await conn.fetchval(_ALERT_SQL, row["org_id"], row["month"], pct) is not None:
                cap_alerts.labels(str(pct)).inc()
                log.warning("org %s has spent %d%% of its monthly cap (%d of %d micro-dollars)",
                            row["name"], pct, row["spent"], row["cap"])
                actions.append(f"alert:{row['org_id']}:{pct}")
        if row["suspend_at_cap"] and row["spent"] >= row["cap"] and row["status"] == "active":
            async with conn.transaction():
                if await conn.fetchval(_SUSPEND_SQL, row["org_id"]) is not None:
                    await conn.execute(_AUDIT_SQL, str(row["org_id"]),
                                       f'{{"reason": "billing_cap_reached", "spent": {row["spent"]}}}')
                    cap_suspensions.inc()
                    actions.append(f"suspend:{row['org_id']}")
    return actions


async def watch_caps(pool: asyncpg.Pool, interval_s: float) -> None:
    while True:
        try:
            async with pool.acquire() as conn:
                await check_caps(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("bill cap check skipped (%s)", exc)
        await asyncio.sleep(interval_s)
