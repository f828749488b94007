"""Helpers for rate-limit tests against the real gateway: tenants with specific limits, counters, ledger."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from crosslogic.ratelimit.engine import charged_key
from crosslogic.store import tenancy

SETTLE_WAIT_S = 30.0
_SET_LIMITS = {
    "org": "UPDATE orgs SET rate_limit_tokens_per_min = $2, rate_limit_requests_per_min = $3, "
           "concurrency_limit = $4 WHERE org_id = $1",
    "env": "UPDATE environments SET rate_limit_tokens_per_min = $2, rate_limit_requests_per_min = $3, "
           "concurrency_limit = $4 WHERE env_id = $1",
    "key": "UPDATE api_keys SET rate_limit_tokens_per_min = $2, rate_limit_requests_per_min = $3, "
           "concurrency_limit = $4 WHERE key_id = $1",
}
LEDGER_FOR_KEY_SQL = "SELECT count(*) AS n, COALESCE(sum(total_tokens), 0) AS tokens FROM usage_records " \
                     "WHERE key_id = $1"


def key_secret(gateway: dict) -> bytes:
    return (Path(gateway["state_dir"]) / "key_secret").read_text().strip().encode()


async def limited_tenant(gateway: dict, keys: int = 1, **limits: tuple[int | None, int | None, int | None]) -> dict:
    """A fresh org/env with `keys` keys; limits per layer as (tokens/min, requests/min, concurrency)."""
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        org = await tenancy.create_org(conn, "rl-" + uuid.uuid4().hex[:10], region_preferences=["ap-south"])
        env = await tenancy.create_env(conn, org.org_id, "prod", region="ap-south")
        made = [await tenancy.create_key(conn, key_secret(gateway), org.org_id, env.env_id, name=f"k{i}")
                for i in range(keys)]
        ids = {"org": org.org_id, "env": env.env_id}
        for layer, values in limits.items():
            targets = [k.key_id for k, _ in made] if layer == "key" else [ids[layer]]
            for target in targets:
                await conn.execute(_SET_LIMITS[layer], uuid.UUID(str(target)), *values)
        return {"org_id": str(org.org_id), "env_id": str(env.env_id),
                "keys": [{"key_id": str(k.key_id), "api_key": plain} for k, plain in made]}
    finally:
        await conn.close()


async def charged(gateway: dict, org_id: str, layer: str, ident: str) -> int:
    redis = aioredis.from_url(gateway["redis_url"])
    try:
        return int(await redis.get(charged_key(org_id, layer, ident)) or 0)
    finally:
        await redis.aclose()


async def ledger_for_key(gateway: dict, key_id: str) -> tuple[int, int]:
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        row = await conn.fetchrow(LEDGER_FOR_KEY_SQL, uuid.UUID(key_id))
        return row["n"], row["tokens"]
    finally:
        await conn.close()


async def wait_for(predicate, what: str, timeout_s: float = SETTLE_WAIT_S):
    """Polls an async predicate until it returns a truthy value (never a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


SET_REGION_LIMIT_SQL = "UPDATE regions SET rate_limit_tokens_per_min = $2 WHERE region_id = $1"
SET_RESERVED_SQL = "UPDATE orgs SET billing_plan = 'reserved', reserved_capacity_tokens_per_sec = $2 WHERE org_id = $1"


async def execute(gateway: dict, sql: str, *args) -> None:
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def quota_counted(gateway: dict, org_id: str, level: str, ident: str, period: str) -> int:
    """Tokens counted against a quota, over every period key present (robust at period boundaries)."""
    redis = aioredis.from_url(gateway["redis_url"])
    try:
        keys = [k async for k in redis.scan_iter(match=f"{{o:{org_id}}}:quota:{level}:{ident}:{period}:*")]
        return sum(int(v or 0) for v in (await redis.mget(keys) if keys else []))
    finally:
        await redis.aclose()
