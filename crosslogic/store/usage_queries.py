"""Usage and cost out of the ledger (usage_records, org_monthly_spend), for the admin API, the dashboard and
`crosslogic usage`: time series in hour or day buckets (UTC) with a breakdown, and an org's month so far.

Never returns node ids or anything of another org: every query is bound to the org ids the caller may see
(None only for a platform-scoped caller).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from crosslogic.store.tenancy import Db, InvalidArgument, NotFound, as_uuid

BUCKETS = ("hour", "day")
# What a series can be broken down by; the SQL expression of each group's label.
GROUPS = {"model": "u.model", "region": "u.region", "key": "u.key_id::text", "env": "u.env_id::text",
          "mode": "u.mode", "org": "u.org_id::text"}
MAX_BUCKETS = 24 * 93  # a quarter of hourly buckets: an answer stays small whatever a caller asks for

_SERIES_SQL = """
SELECT date_trunc($1, u.occurred_at AT TIME ZONE 'UTC') AS bucket, {group} AS grp,
       count(*)::bigint AS requests, sum(u.prompt_tokens)::bigint AS prompt_tokens,
       sum(u.completion_tokens)::bigint AS completion_tokens, sum(u.total_tokens)::bigint AS total_tokens,
       sum(u.cost_microdollars)::bigint AS cost_microdollars
FROM usage_records u
WHERE u.occurred_at >= $2 AND u.occurred_at < $3
  AND ($4::uuid IS NULL OR u.org_id = $4) AND ($5::uuid IS NULL OR u.env_id = $5)
  AND ($6::uuid IS NULL OR u.key_id = $6) AND ($7::text IS NULL OR u.model = $7)
  AND ($8::text IS NULL OR u.region = $8) AND ($9::text IS NULL OR u.mode = $9)
GROUP BY 1, 2 ORDER BY 1, 2
"""
_MONTH_SQL = """
SELECT o.org_id::text, o.name, o.billing_plan, o.reserved_capacity_tokens_per_sec AS reserved_tps,
       o.free_tokens_per_month, o.monthly_bill_cap_microdollars, o.suspend_at_cap, o.stripe_customer_id,
       o.pricing_tier, o.discount_ppm,
       coalesce(s.tokens, 0)::bigint AS tokens, coalesce(s.cost_microdollars, 0)::bigint AS cost_microdollars,
       coalesce(s.free_tokens, 0)::bigint AS free_tokens_used,
       coalesce(s.owed_microdollars, 0)::bigint AS owed_microdollars,
       crosslogic_monthly_allowance(o.billing_plan, o.free_tokens_per_month, o.reserved_capacity_tokens_per_sec,
                                    o.reserved_overage_billed, $2) AS allowance_tokens
FROM orgs o LEFT JOIN org_monthly_spend s ON s.org_id = o.org_id AND s.month = $2
WHERE o.org_id = $1
"""
_EXPORTS_SQL = """
SELECT status, count(*)::bigint AS exports, coalesce(sum(value), 0)::bigint AS value,
       max(sent_at) AS last_sent_at
FROM billing_exports WHERE org_id = $1 GROUP BY status
"""
# Test keys' usage this month: shown beside the bill, never part of it (migration 012).
_TEST_USAGE_SQL = """
SELECT count(*)::bigint AS requests, coalesce(sum(total_tokens), 0)::bigint AS tokens FROM usage_records
WHERE org_id = $1 AND occurred_at >= $2 AND mode = 'test'
"""
# A reserved plan whose overage is not billed has an unlimited allowance (the SQL function's bigint maximum).
UNLIMITED = 9223372036854775807


@dataclass(frozen=True)
class SeriesQuery:
    bucket: str = "hour"
    since: datetime | None = None  # default: 24 buckets back from `until`
    until: datetime | None = None  # default: now
    group_by: str | None = None
    org_id: str | None = None  # None: every org (platform scope only)
    env_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    region: str | None = None
    mode: str | None = None  # "live" / "test" (a test key's rows cost 0: test_keys in docs/admin-api.md)

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        step = timedelta(hours=1) if self.bucket == "hour" else timedelta(days=1)
        until = self.until or now
        since = self.since or until - 24 * step
        for t in (since, until):
            if t.tzinfo is None:
                raise InvalidArgument("times need a time zone (e.g. 2027-01-01T00:00:00Z)")
        if since >= until:
            raise InvalidArgument("since must be before until")
        if (until - since) / step > MAX_BUCKETS:
            raise InvalidArgument(f"at most {MAX_BUCKETS} {self.bucket} buckets per query")
        return since, until


def _uuid_or_none(value: str | None, what: str) -> uuid.UUID | None:
    if value is None:
        return None
    parsed = as_uuid(value)
    if parsed is None:
        raise InvalidArgument(f"{what} must be a UUID, not {value!r}")
    return parsed


async def usage_series(db: Db, query: SeriesQuery, now: datetime | None = None) -> list[dict]:
    if query.bucket not in BUCKETS:
        raise InvalidArgument(f"bucket must be one of {', '.join(BUCKETS)}, not {query.bucket!r}")
    if query.group_by is not None and query.group_by not in GROUPS:
        raise InvalidArgument(f"group_by must be one of {', '.join(GROUPS)}, not {query.group_by!r}")
    since, until = query.window(now or datetime.now(UTC))
    group = GROUPS[query.group_by] if query.group_by else "NULL::text"
    rows = await db.fetch(_SERIES_SQL.format(group=group), query.bucket, since, until,
                          _uuid_or_none(query.org_id, "org_id"), _uuid_or_none(query.env_id, "env_id"),
                          _uuid_or_none(query.key_id, "key_id"), query.model, query.region, query.mode)
    return [{"bucket": r["bucket"].replace(tzinfo=UTC).isoformat(), "group": r["grp"], "requests": r["requests"],
             "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
             "total_tokens": r["total_tokens"], "cost_microdollars": r["cost_microdollars"]} for r in rows]


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def org_month(db: Db, org_id: str, now: datetime | None = None) -> dict:
    """The org's month so far: tokens, cost, the free tier (allowance, used, remaining), plan and reserved
    capacity, bill cap, and its Stripe exports by status (billing status)."""
    month = month_start(now or datetime.now(UTC))
    org_uuid = _uuid_or_none(org_id, "org_id")
    row = await db.fetchrow(_MONTH_SQL, org_uuid, month.date())
    if row is None:
        raise NotFound(f"org {org_id!r} not found")
    allowance = row["allowance_tokens"]
    unlimited = allowance >= UNLIMITED
    exports = {r["status"]: {"exports": r["exports"], "value": r["value"],
                             "last_sent_at": r["last_sent_at"].isoformat() if r["last_sent_at"] else None}
               for r in await db.fetch(_EXPORTS_SQL, org_uuid)}
    test = await db.fetchrow(_TEST_USAGE_SQL, org_uuid, month)
    return {
        "org_id": row["org_id"], "org_name": row["name"], "month": month.date().isoformat(),
        "billing_plan": row["billing_plan"], "pricing_tier": row["pricing_tier"], "discount_ppm": row["discount_ppm"],
        "reserved_tokens_per_sec": row["reserved_tps"],
        "tokens": row["tokens"], "cost_microdollars": row["cost_microdollars"],
        "owed_microdollars": row["owed_microdollars"],
        "free_tier": {"allowance_tokens": None if unlimited else allowance, "unlimited": unlimited,
                      "used_tokens": row["free_tokens_used"],
                      "remaining_tokens": None if unlimited else max(0, allowance - row["free_tokens_used"])},
        "bill_cap_microdollars": row["monthly_bill_cap_microdollars"], "suspend_at_cap": row["suspend_at_cap"],
        "stripe_customer": row["stripe_customer_id"] is not None,
        "exports": exports,
        "test_usage": {"requests": test["requests"], "tokens": test["tokens"]},  # free: in none of the above
    }
