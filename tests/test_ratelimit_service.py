"""The rate-limit service on real Valkey (stopped and restarted) and Postgres: Redis-down policy, recovery,
shadow mode, limits loaded from plan defaults, overrides and the platform tables."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.service import LimiterUnavailable, RateLimitServicer, response_for
from crosslogic.ratelimit.store import LimitStore
from crosslogic.runtime.valkey import EmbeddedValkey
from crosslogic.store import tenancy
from crosslogic.store.db import open_pool
from tests.ratelimit_helpers import wait_for


async def _tenant(database_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('ap-south', 'Mumbai')")
        org = await tenancy.create_org(conn, "acme")
        env = await tenancy.create_env(conn, org.org_id, "prod")
        key, _ = await tenancy.create_key(conn, b"secret", org.org_id, env.env_id, rate_limit_tokens_per_min=1_000)
        return {"org_id": str(org.org_id), "env_id": str(env.env_id), "key_id": str(key.key_id)}
    finally:
        await conn.close()


def _entries(tenant: dict[str, str], reserve: int = 100) -> dict[str, str]:
    return {**tenant, "reserve": str(reserve), "request_id": uuid.uuid4().hex}


@pytest.fixture
def own_valkey(tmp_path):
    server = EmbeddedValkey(tmp_path / "valkey").start()
    yield server
    server.stop()


async def test_redis_down_fails_open_by_default_then_limits_again_when_it_returns(database_url, own_valkey):
    tenant = await _tenant(database_url)
    redis = aioredis.from_url(own_valkey.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    async with open_pool(database_url) as pool:
        servicer = RateLimitServicer(Limiter(redis), LimitStore(pool))
        assert (await servicer.decide(_entries(tenant, reserve=900))).admitted

        own_valkey.stop()
        degraded = await servicer.decide(_entries(tenant, reserve=5_000))
        assert degraded.admitted and degraded.degraded

        own_valkey.start()  # same port, scripts forgotten: the limiter reloads them by itself

        async def answering():  # until Valkey has loaded its data, decisions stay degraded (fail-open)
            decision = await servicer.decide(_entries(tenant, reserve=1_000))
            return None if decision.degraded else decision

        # The 900 tokens reserved before the outage are still spent (1,000/min refills them in 54 s).
        assert not (await wait_for(answering, "Valkey to answer again")).admitted
        assert (await servicer.decide(_entries(tenant, reserve=50))).admitted
    await redis.aclose()


async def test_fail_closed_layer_refuses_while_redis_is_down(database_url, own_valkey):
    tenant = await _tenant(database_url)
    conn = await asyncpg.connect(database_url)
    await conn.execute("UPDATE rate_limit_layers SET fail_open = false WHERE layer = 'key'")
    await conn.close()
    redis = aioredis.from_url(own_valkey.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    async with open_pool(database_url) as pool:
        servicer = RateLimitServicer(Limiter(redis), LimitStore(pool))
        own_valkey.stop()
        with pytest.raises(LimiterUnavailable):  # Envoy turns the gRPC error into its 503 (status_on_error)
            await servicer.decide(_entries(tenant))
        own_valkey.start()

        async def admitted_again():
            try:
                return (await servicer.decide(_entries(tenant))).admitted
            except LimiterUnavailable:  # still loading its data
                return False

        await wait_for(admitted_again, "Valkey to answer again")
    await redis.aclose()


async def test_shadow_layer_admits_over_its_limit_through_the_service(database_url, own_valkey):
    tenant = await _tenant(database_url)
    conn = await asyncpg.connect(database_url)
    await conn.execute("UPDATE rate_limit_layers SET shadow = true WHERE layer = 'key'")
    await conn.close()
    redis = aioredis.from_url(own_valkey.url)
    async with open_pool(database_url) as pool:
        servicer = RateLimitServicer(Limiter(redis), LimitStore(pool))
        assert (await servicer.decide(_entries(tenant, reserve=1_000))).admitted
        over = await servicer.decide(_entries(tenant, reserve=500))
        assert over.admitted and over.shadow_layer == "key"
        assert response_for(over).overall_code == response_for(over).OK
    await redis.aclose()


async def test_limits_load_from_plan_defaults_overrides_and_platform_tables(database_url):
    tenant = await _tenant(database_url)
    conn = await asyncpg.connect(database_url)
    await conn.execute("UPDATE orgs SET billing_plan = 'free', reserved_capacity_tokens_per_sec = 5")
    await conn.execute("UPDATE environments SET concurrency_limit = 3, rate_limit_tokens_per_sec = 50")
    await conn.execute("UPDATE global_limits SET tokens_per_day = 10000000, concurrency_limit = 900")
    await conn.execute("UPDATE regions SET rate_limit_tokens_per_sec = 700 WHERE region_id = 'ap-south'")
    await conn.close()
    async with open_pool(database_url) as pool:
        store = LimitStore(pool)
        limits = await store.for_key(tenant["key_id"])
        platform = await store.platform()
    # The free plan's defaults fill the org layer; the key's own override (1,000/min) stays.
    assert (limits.org.tokens_per_min, limits.org.requests_per_min, limits.org.tokens_per_day,
            limits.org.concurrency) == (40_000, 60, 1_000_000, 8)
    assert (limits.env.concurrency, limits.env.tokens_per_sec) == (3, 50)
    assert limits.key.tokens_per_min == 1_000 and limits.reserved_tokens_per_sec == 5
    assert (platform.global_.tokens_per_day, platform.global_.concurrency) == (10_000_000, 900)
    assert platform.for_region("ap-south")[1].tokens_per_sec == 700
