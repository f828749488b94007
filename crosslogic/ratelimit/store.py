"""Limits from Postgres: the one merge of plan defaults, org/env/key overrides and layer policy.

The SQL is written once, as fragments: ext_authz's per-key tenant view (extauthz/tenants.py) selects
`TENANT_LIMIT_COLUMNS` in its one join per key, and `LimitStore` here (the rate-limit service in admission
"rls", and `crosslogic limits show`) selects them by key id. `tenant_limits` turns either row into limits.

LimitStore caches per key for `ttl_s` seconds; a NOTIFY on `crosslogic_limits` (any limit column or policy
changed) drops the whole cache at once, so a new limit applies within one round trip of the notification.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from crosslogic.contract import LIMITS_CHANNEL
from crosslogic.ratelimit.limits import UNLIMITED, LayerLimits, PlatformLimits, TenantLimits
from crosslogic.store.db import follow_notifications

log = logging.getLogger("crosslogic.ratelimit")

# api_keys k, environments e, orgs o: the tenant rows; p: the org's plan defaults; lo/le/lk: each layer's policy;
# tk: the caps of a test key (migration 012), no row for a live key. LEAST ignores NULLs, so a test key's limit
# is the smaller of its own and the cap, and a live key's is its own.
TENANT_JOINS = """
api_keys k
JOIN environments e ON e.env_id = k.env_id
JOIN orgs o ON o.org_id = k.org_id
LEFT JOIN plan_limits p ON p.billing_plan = o.billing_plan
LEFT JOIN rate_limit_layers lo ON lo.layer = 'org'
LEFT JOIN rate_limit_layers le ON le.layer = 'env'
LEFT JOIN rate_limit_layers lk ON lk.layer = 'key'
LEFT JOIN test_key_limits tk ON k.mode = 'test'
"""
TENANT_LIMIT_COLUMNS = """
o.rate_limit_tokens_per_sec AS org_tps, e.rate_limit_tokens_per_sec AS env_tps,
k.rate_limit_tokens_per_sec AS key_tps,
COALESCE(o.rate_limit_tokens_per_min, p.tokens_per_min) AS org_tpm,
COALESCE(o.rate_limit_requests_per_min, p.requests_per_min) AS org_rpm,
COALESCE(o.rate_limit_tokens_per_day, p.tokens_per_day) AS org_tpd,
COALESCE(o.concurrency_limit, p.concurrency_limit) AS org_conc,
e.rate_limit_tokens_per_min AS env_tpm, e.rate_limit_requests_per_min AS env_rpm,
e.concurrency_limit AS env_conc,
LEAST(k.rate_limit_tokens_per_min, tk.tokens_per_min) AS key_tpm,
LEAST(k.rate_limit_requests_per_min, tk.requests_per_min) AS key_rpm,
LEAST(k.concurrency_limit, tk.concurrency_limit) AS key_conc, o.reserved_capacity_tokens_per_sec AS reserved_tps,
o.rate_limit_shadow AS org_shadow, e.rate_limit_shadow AS env_shadow, k.rate_limit_shadow AS key_shadow,
o.rate_limit_shadow_limits AS org_shadow_limits, e.rate_limit_shadow_limits AS env_shadow_limits,
k.rate_limit_shadow_limits AS key_shadow_limits,
COALESCE(lo.fail_open, true) AS org_fail_open, COALESCE(lo.shadow, false) AS org_layer_shadow,
COALESCE(le.fail_open, true) AS env_fail_open, COALESCE(le.shadow, false) AS env_layer_shadow,
COALESCE(lk.fail_open, true) AS key_fail_open, COALESCE(lk.shadow, false) AS key_layer_shadow
"""
TENANT_LIMITS_SQL = f"SELECT {TENANT_LIMIT_COLUMNS} FROM {TENANT_JOINS} WHERE k.key_id = $1"
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


def tenant_limits(row: Mapping[str, Any]) -> TenantLimits:
    """A row holding TENANT_LIMIT_COLUMNS as limits, the layer policy merged in."""
    def layer(name: str, tpd: int | None = None) -> LayerLimits:
        return LayerLimits(tokens_per_sec=row[f"{name}_tps"], tokens_per_min=row[f"{name}_tpm"],
                           requests_per_min=row[f"{name}_rpm"],
                           tokens_per_day=tpd, concurrency=row[f"{name}_conc"],
                           shadow=row[f"{name}_layer_shadow"] or row[f"{name}_shadow"],
                           shadow_kinds=frozenset(row[f"{name}_shadow_limits"] or ()),
                           fail_open=row[f"{name}_fail_open"])

    return TenantLimits(org=layer("org", row["org_tpd"]), env=layer("env"), key=layer("key"),
                        reserved_tokens_per_sec=row["reserved_tps"] or 0)


def _platform_layer(row: asyncpg.Record | dict, policy: tuple[bool, bool]) -> LayerLimits:
    fail_open, shadow = policy
    return LayerLimits(tokens_per_sec=row["tokens_per_sec"], tokens_per_min=row["tokens_per_min"],
                       tokens_per_day=row["tokens_per_day"], requests_per_min=row["requests_per_min"],
                       concurrency=row["concurrency_limit"], shadow=shadow, fail_open=fail_open)


async def load_platform(db: asyncpg.Pool | asyncpg.Connection) -> PlatformLimits:
    """The layers every tenant shares (global, per region), with their policy: a snapshot, changed rarely."""
    policy = {r["layer"]: (r["fail_open"], r["shadow"]) for r in await db.fetch(LAYER_POLICY_SQL)}
    row = await db.fetchrow(GLOBAL_LIMITS_SQL)
    regions = await db.fetch(REGION_LIMITS_SQL)
    return PlatformLimits(
        global_=_platform_layer(row, policy.get("global", (True, False))) if row else LayerLimits(),
        regions={r["region_id"]: _platform_layer(r, policy.get("region", (True, False))) for r in regions})


class LimitStore:
    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection, ttl_s: float = 10.0) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, TenantLimits]] = {}
        self._platform: tuple[float, PlatformLimits] | None = None

    def clear(self) -> None:
        self._cache.clear()
        self._platform = None

    async def platform(self) -> PlatformLimits:
        now = time.monotonic()
        if self._platform is not None and now - self._platform[0] < self.ttl_s:
            return self._platform[1]
        limits = await load_platform(self.pool)
        self._platform = (now, limits)
        return limits

    async def for_key(self, key_id: str) -> TenantLimits:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        row = await self.pool.fetchrow(TENANT_LIMITS_SQL, key_id)
        limits = UNLIMITED if row is None else tenant_limits(row)
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
