"""ext_authz's per-key tenant view on real Postgres: one query per key, one cache, one invalidation path (the
LISTEN loop), the generation counter against stale refills, clearing on reconnect, serving through an outage."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from crosslogic.extauthz.tenants import TENANT_VIEW_SQL, TenantCache, follow_changes
from crosslogic.keys import hash_api_key
from crosslogic.store import tenancy
from tests.ratelimit_helpers import wait_for

SECRET = b"views-secret"


async def _tenant(conn: asyncpg.Connection, **env: object) -> dict:
    await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('eu-central', 'Frankfurt') "
                       "ON CONFLICT DO NOTHING")
    org = await tenancy.create_org(conn, "t-" + uuid.uuid4().hex[:8], region_preferences=["eu-central"])
    made = await tenancy.create_env(conn, org.org_id, "prod", **env)
    key, plaintext = await tenancy.create_key(conn, SECRET, org.org_id, made.env_id)
    return {"org": str(org.org_id), "env": str(made.env_id), "key": str(key.key_id),
            "hash": hash_api_key(SECRET, plaintext)}


@pytest.fixture
async def pool(database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


class CountingPool:
    """The pool, counting the view queries and able to hold them (a read in flight) or fail them (an outage)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.view_queries = 0
        self.hold: asyncio.Event | None = None
        self.down = False

    async def fetchrow(self, sql: str, *args):
        hold = self.hold  # the calls made while it is set wait for it, after their read
        if sql == TENANT_VIEW_SQL:
            self.view_queries += 1
        if self.down:
            raise OSError("connection refused")
        row = await self.pool.fetchrow(sql, *args)
        if hold is not None:
            await hold.wait()
        return row

    async def fetch(self, sql: str, *args):
        if self.down:
            raise OSError("connection refused")
        return await self.pool.fetch(sql, *args)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def _listening(database_url: str, views: TenantCache) -> asyncio.Task:
    """The one change feed, connected (its first connect clears the cache: wait for that)."""
    connected = asyncio.Event()
    generation = views.generation

    async def follow(*args, **kwargs):
        from crosslogic.store.db import follow_notifications

        on_connected = args[3]

        def connected_then(*inner):
            on_connected(*inner)
            connected.set()

        await follow_notifications(args[0], args[1], args[2], connected_then, *args[4:], **kwargs)

    feed = asyncio.create_task(follow_changes(database_url, views, lambda: None, lambda: None, follow=follow))
    await asyncio.wait_for(connected.wait(), 10)
    assert views.generation > generation
    return feed


async def test_one_query_per_key_carries_identity_limits_quotas_and_region(pool):
    async with pool.acquire() as conn:
        t = await _tenant(conn, quota_tokens_per_day=5_000)
        await conn.execute("UPDATE api_keys SET rate_limit_requests_per_min = 7 WHERE key_id = $1", uuid.UUID(t["key"]))
        await conn.execute("UPDATE rate_limit_layers SET fail_open = false WHERE layer = 'env'")
    counting = CountingPool(pool)
    views = TenantCache(counting)  # type: ignore[arg-type]
    got = await asyncio.gather(*(views.view(t["hash"]) for _ in range(50)))  # a burst of a key's first requests
    assert counting.view_queries == 1 and all(v is got[0] for v in got)
    view = got[0]
    assert (view.org_id, view.env_id, view.key_id, view.region) == (t["org"], t["env"], t["key"], "eu-central")
    assert (view.org_status, view.env_status, view.key_status) == ("active", "active", "active")
    assert view.limits.key.requests_per_min == 7 and view.limits.org.tokens_per_min == 2_000_000  # plan default
    assert not view.limits.env.fail_open and view.limits.key.fail_open  # the layer policy, joined
    assert view.quotas.env_day == 5_000 and view.cap is None
    assert await views.view(hash_api_key(SECRET, "clsk_live_" + "0" * 32)) is None
    assert counting.view_queries == 2


async def test_a_change_drops_only_the_views_it_touches_and_a_new_key_is_found(pool, database_url):
    async with pool.acquire() as conn:
        a, b = await _tenant(conn), await _tenant(conn)
    counting = CountingPool(pool)
    views = TenantCache(counting, ttl_s=3600)  # type: ignore[arg-type]
    feed = await _listening(database_url, views)
    try:
        assert (await views.view(a["hash"])).env_status == "active"
        assert (await views.view(b["hash"])) is not None
        unknown = hash_api_key(SECRET, "clsk_live_" + "1" * 32)
        assert await views.view(unknown) is None  # remembered as unknown
        async with pool.acquire() as conn:
            await conn.execute("UPDATE environments SET status = 'suspended' WHERE env_id = $1", uuid.UUID(a["env"]))

        async def suspended() -> bool:
            return (await views.view(a["hash"])).env_status == "suspended"

        await wait_for(suspended, "the suspension to reach the view", 5)
        queries = counting.view_queries
        assert (await views.view(b["hash"])) is not None and counting.view_queries == queries  # b stayed cached
        async with pool.acquire() as conn:  # a new key: its INSERT notifies, the unknown-key entries go
            await conn.execute("UPDATE api_keys SET key_hash = $1 WHERE key_id = $2", unknown, uuid.UUID(b["key"]))

        async def found() -> bool:
            return await views.view(unknown) is not None

        await wait_for(found, "a key created after it was asked for", 5)
        async with pool.acquire() as conn:  # a plan default is part of every view
            await conn.execute("UPDATE plan_limits SET requests_per_min = 11 WHERE billing_plan = 'serverless'")

        async def plan_applied() -> bool:
            return (await views.view(b["hash"]) or (await views.view(unknown))).limits.org.requests_per_min == 11

        await wait_for(plan_applied, "the plan default to reach the views", 5)
        platform = await views.platform()
        async with pool.acquire() as conn:
            await conn.execute("UPDATE global_limits SET concurrency_limit = 99")

        async def platform_applied() -> bool:
            return (await views.platform()).global_.concurrency == 99

        await wait_for(platform_applied, "the global limit to reach the snapshot", 5)
        assert platform.global_.concurrency is None
    finally:
        feed.cancel()
        await asyncio.gather(feed, return_exceptions=True)
        await views.aclose()


async def test_a_load_in_flight_during_an_invalidation_cannot_refill_the_old_state(pool):
    async with pool.acquire() as conn:
        t = await _tenant(conn)
    counting = CountingPool(pool)
    views = TenantCache(counting)  # type: ignore[arg-type]
    release = counting.hold = asyncio.Event()
    first = asyncio.create_task(views.view(t["hash"]))  # will read "active", then wait before storing it
    await wait_for(lambda: asyncio.sleep(0, counting.view_queries == 1), "the read to start", 5)
    await asyncio.sleep(0.1)
    counting.hold = None
    async with pool.acquire() as conn:
        await conn.execute("UPDATE api_keys SET status = 'revoked' WHERE key_id = $1", uuid.UUID(t["key"]))
    views.tenancy_changed("api_keys", t["key"])  # what the NOTIFY of that commit does
    later = await views.view(t["hash"])  # after the change: its own read, not the one in flight
    assert later.key_status == "revoked" and counting.view_queries == 2
    release.set()
    assert (await first).key_status == "active"  # it began before the change: either answer was right
    assert (await views.view(t["hash"])).key_status == "revoked"  # the old read did not overwrite the new one
    assert counting.view_queries == 2


async def test_a_reconnected_feed_clears_everything(pool, database_url):
    async with pool.acquire() as conn:
        t = await _tenant(conn)
    counting = CountingPool(pool)
    views = TenantCache(counting, ttl_s=3600)  # type: ignore[arg-type]
    feed = await _listening(database_url, views)
    try:
        await views.view(t["hash"])
        await views.platform()
        generation = views.generation
        async with pool.acquire() as conn:  # the feed's connection dies: notifications may be missed meanwhile
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' "
                               "AND pid <> pg_backend_pid()")

        async def cleared() -> bool:
            return views.generation > generation and not views._views and views._platform is None

        await wait_for(cleared, "the reconnect to clear the views", 10)
        queries = counting.view_queries
        await views.view(t["hash"])
        assert counting.view_queries == queries + 1
    finally:
        feed.cancel()
        await asyncio.gather(feed, return_exceptions=True)


async def test_a_due_view_is_reread_in_the_background_and_an_outage_serves_the_last_one(pool):
    async with pool.acquire() as conn:
        t = await _tenant(conn)
        capped = await _tenant(conn)
        await conn.execute("UPDATE orgs SET monthly_bill_cap_microdollars = 10 WHERE org_id = $1",
                           uuid.UUID(capped["org"]))
    clock, counting = Clock(), CountingPool(pool)
    views = TenantCache(counting, ttl_s=10, capped_ttl_s=1, clock=clock)  # type: ignore[arg-type]
    view = await views.view(t["hash"])
    assert (await views.view(capped["hash"])).cap is not None
    clock.now += 5  # fresh
    assert await views.view(t["hash"]) is view and counting.view_queries == 2
    await views.view(capped["hash"])  # a capped org's view is due after a second: its owed amount moves
    await wait_for(lambda: asyncio.sleep(0, counting.view_queries == 3), "the capped view's re-read", 5)
    clock.now += 6  # due: served at once, re-read behind it
    assert await views.view(t["hash"]) is view
    await wait_for(lambda: asyncio.sleep(0, counting.view_queries == 4), "the background re-read", 5)
    clock.now += 25  # past twice the TTL: read before use
    counting.down = True  # ... but Postgres is away: the last view serves
    assert (await views.view(t["hash"])).key_id == t["key"]
    with pytest.raises(OSError):  # a key never seen cannot be answered
        await views.view(hash_api_key(SECRET, "clsk_live_" + "2" * 32))
    await views.aclose()
