"""Limits from Postgres, cached per key: the hot path never waits on Postgres twice for one key.

Entries live `ttl_s` seconds; a NOTIFY on `crosslogic_limits` (any limit column or policy changed)
drops the whole cache at once, so a new limit applies within one round trip of the notification.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import asyncpg

from crosslogic.contract import LIMITS_CHANNEL
from crosslogic.ratelimit.limits import UNLIMITED, LayerLimits, PlatformLimits, TenantLimits
from crosslogic.store.db import follow_notifications

log = logging.getLogger("crosslogic.ratelimit")

TENANT_LIMITS_SQL = """
SELECT o.rate_limit_tokens_per_sec AS org_tps, e.rate_limit_tokens_per_sec AS env_tps,
       k.rate_limit_tokens_per_sec AS key_tps,
       COALESCE(o.rate_limit_tokens_per_min, p.tokens_per_min) AS org_tpm,
       COALESCE(o.rate_limit_requests_per_min, p.requests_per_min) AS org_rpm,
       COALESCE(o.rate_limit_tokens_per_day, p.tokens_per_day) AS org_tpd,
       COALESCE(o.concurrency_limit, p.concurrency_limit) AS org_conc,
       e.rate_limit_tokens_per_min AS env_tpm, e.rate_limit_requests_per_min AS env_rpm,
       e.concurrency_limit AS env_conc,
       k.rate_limit_tokens_per_min AS key_tpm, k.rate_limit_requests_per_min AS key_rpm,
       k.concurrency_limit AS key_conc, o.reserved_capacity_tokens_per_sec AS reserved_tps,
       o.rate_limit_shadow AS org_shadow, e.rate_limit_shadow AS env_shadow, k.rate_limit_shadow AS key_shadow,
       o.rate_limit_shadow_limits AS org_shadow_limits, e.rate_limit_shadow_limits AS env_shadow_limits,
       k.rate_limit_shadow_limits AS key_shadow_limits
FROM api_keys k
JOIN environments e ON e.env_id = k.env_id
JOIN orgs o ON o.org_id = k.org_id
LEFT JOIN plan_limits p ON p.billing_plan = o.billing_plan
WHERE k.key_id = $1
"""
LAYER_POLICY_SQL = "SELECT layer, fail_open, shadow FROM rate_limit_layers"
GLOBAL_LIMITS_SQL = """
SELECT tokens_per_sec, tokens_per_min, tokens_per_day, requests_per_min, concurrency_limit FROM global_limits
"""
REGION_LIMITS_SQL = """
SELECT region_id, rate_limit_tokens_per_sec AS tokens_per_sec, rate_limit_tokens_per_min AS tokens_per_min,
       NULL::bigint AS tokens_per_day, rate_limit_requests_per_min AS requests_per_min, concurrency_limit
FROM regions
WHERE rate_limit_tokens_per_sec IS NOT NULL OR rate_limit_tokens_per_min IS NOT NULL
   OR rate_limit_requests_per_min IS NOT NULL OR concurrency_limit IS NOT NULL
"""


def tenant_limits(row: asyncpg.Record | dict, policy: dict[str, tuple[bool, bool]]) -> TenantLimits:
    def layer(name: str, tpd: int | None = None) -> LayerLimits:
        fail_open, shadow = policy.get(name, (True, False))
        return LayerLimits(tokens_per_sec=row[f"{name}_tps"], tokens_per_min=row[f"{name}_tpm"],
                           requests_per_min=row[f"{name}_rpm"],
                           tokens_per_day=tpd, concurrency=row[f"{name}_conc"],
                           shadow=shadow or row[f"{name}_shadow"],
                           shadow_kinds=frozenset(row[f"{name}_shadow_limits"] or ()),
                           fail_open=fail_open)

    return TenantLimits(org=layer("org", row["org_tpd"]), env=layer("env"), key=layer("key"),
                        reserved_tokens_per_sec=row["reserved_tps"] or 0)


def _platform_layer(row: asyncpg.Record | dict, policy: tuple[bool, bool]) -> LayerLimits:
    fail_open, shadow = policy
    return LayerLimits(tokens_per_sec=row["tokens_per_sec"], tokens_per_min=row["tokens_per_min"],
                       tokens_per_day=row["tokens_per_day"], requests_per_min=row["requests_per_min"],
                       concurrency=row["concurrency_limit"], shadow=shadow, fail_open=fail_open)


class LimitStore:
    def __init__(self, pool: asyncpg.Pool, ttl_s: float = 10.0) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, TenantLimits]] = {}
        self._policy: dict[str, tuple[bool, bool]] | None = None
        self._platform: tuple[float, PlatformLimits] | None = None

    def clear(self) -> None:
        self._cache.clear()
        self._policy = None
        self._platform = None

    async def platform(self) -> PlatformLimits:
        now = time.monotonic()
        if self._platform is not None and now - self._platform[0] < self.ttl_s:
            return self._platform[1]
        policy = await self.policy()
        row = await self.pool.fetchrow(GLOBAL_LIMITS_SQL)
        regions = await self.pool.fetch(REGION_LIMITS_SQL)
        limits = PlatformLimits(
            global_=_platform_layer(row, policy.get("global", (True, False))) if row else LayerLimits(),
            regions={r["region_id"]: _platform_layer(r, policy.get("region", (True, False))) for r in regions})
        self._platform = (now, limits)
        return limits

    async def policy(self) -> dict[str, tuple[bool, bool]]:
        if self._policy is None:
            rows = await self.pool.fetch(LAYER_POLICY_SQL)
            self._policy = {r["layer"]: (r["fail_open"], r["shadow"]) for r in rows}
        return self._policy

    async def for_key(self, key_id: str) -> TenantLimits:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        policy = await self.policy()
        row = await self.pool.fetchrow(TENANT_LIMITS_SQL, key_id)
        limits = UNLIMITED if row is None else tenant_limits(row, policy)
        self._cache[key_id] = (now, limits)
        return limits

    def cached_platform(self) -> PlatformLimits | None:
        return self._platform[1] if self._platform else None

    def cached(self, key_id: str) -> TenantLimits | None:
        """The last known limits, however old: what the failure policy uses when Postgres is away."""
        hit = self._cache.get(key_id)
        return hit[1] if hit else None


async def follow_limit_changes(database_url: str, clear: Callable[[], None]) -> None:
    """LISTEN for limit changes until cancelled (calling `clear` on each), reconnecting when Postgres goes away.
    The cache is kept while the feed is down: it is what the failure policy falls back on."""
    await follow_notifications(database_url, [LIMITS_CHANNEL], lambda _channel, _payload: clear(), clear,
                               "limit change feed")
