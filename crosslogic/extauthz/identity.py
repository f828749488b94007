"""API key -> key / environment / org, through three tiers: process LRU, shared Redis (60 s), Postgres.

Postgres triggers NOTIFY on every change to orgs, environments and api_keys; each authz replica
listens, empties its local tier and deletes the affected Redis entries, so a revocation or suspension
takes effect on every replica within milliseconds of the commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import asyncpg
import redis.asyncio as aioredis

from crosslogic.contract import ROUTING_CHANNEL, TENANCY_CHANNEL
from crosslogic.store.db import follow_notifications

log = logging.getLogger("crosslogic.extauthz")

_IDENTITY_SQL = """
SELECT k.key_id::text AS key_id, k.org_id::text AS org_id, k.env_id::text AS env_id,
       k.status AS key_status, k.region AS key_region, k.rate_limit_tokens_per_min,
       e.status AS env_status, e.region AS env_region, e.model_list AS env_models,
       o.status AS org_status, o.region_preferences AS org_regions, o.billing_plan
FROM api_keys k
JOIN environments e ON e.env_id = k.env_id
JOIN orgs o ON o.org_id = k.org_id
WHERE k.key_hash = $1
"""


@dataclass(frozen=True)
class Identity:
    key_id: str
    org_id: str
    env_id: str
    key_status: str
    env_status: str
    org_status: str
    region: str | None  # the key's, else the env's, else the org's first preference
    allowed_models: tuple[str, ...]  # empty = every active model
    billing_plan: str
    rate_limit_tokens_per_min: int | None


def _decode_json(value: object) -> list:
    if isinstance(value, str):
        value = json.loads(value)
    return list(value) if isinstance(value, list) else []


def identity_from_row(row: asyncpg.Record) -> Identity:
    org_regions = _decode_json(row["org_regions"])
    return Identity(
        key_id=row["key_id"], org_id=row["org_id"], env_id=row["env_id"],
        key_status=row["key_status"], env_status=row["env_status"], org_status=row["org_status"],
        region=row["key_region"] or row["env_region"] or (org_regions[0] if org_regions else None),
        allowed_models=tuple(_decode_json(row["env_models"])),
        billing_plan=row["billing_plan"], rate_limit_tokens_per_min=row["rate_limit_tokens_per_min"],
    )


def _cache_key(key_hash: str) -> str:
    return f"clp:idcache:{key_hash}"


def _dependents_key(kind: str, entity_id: str) -> str:
    return f"clp:idcache-deps:{kind}:{entity_id}"


_MISSING = object()


class IdentityResolver:
    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, *, redis_ttl_s: int = 60,
                 local_ttl_s: float = 30.0, local_max: int = 100_000) -> None:
        self.pool = pool
        self.redis = redis
        self.redis_ttl_s = redis_ttl_s
        self.local_ttl_s = local_ttl_s
        self.local_max = local_max
        self._local: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()
        # Bumped by every invalidation: a lookup that started before one must not refill the local tier
        # with what it read (it may be the old state).
        self._generation = 0

    async def resolve(self, key_hash: str) -> Identity | None:
        hit = self._local.get(key_hash)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        generation = self._generation
        identity = await self._from_redis(key_hash)
        if identity is _MISSING:
            identity = await self._from_postgres(key_hash)
            if identity is not None and generation == self._generation:
                await self._share(key_hash, identity)
        if generation == self._generation:
            self._remember(key_hash, identity, now)  # unknown keys too: NOTIFY clears them on insert
        return identity  # type: ignore[return-value]

    def _remember(self, key_hash: str, identity: Identity | None, now: float) -> None:
        self._local[key_hash] = (now + self.local_ttl_s, identity)
        self._local.move_to_end(key_hash)
        while len(self._local) > self.local_max:
            self._local.popitem(last=False)

    async def _from_redis(self, key_hash: str) -> Identity | None | object:
        try:
            raw = await self.redis.get(_cache_key(key_hash))
        except aioredis.RedisError as exc:
            log.warning("identity cache unavailable: %s", exc)
            return _MISSING
        if raw is None:
            return _MISSING
        data = json.loads(raw)
        return None if data is None else Identity(**{**data, "allowed_models": tuple(data["allowed_models"])})

    async def _from_postgres(self, key_hash: str) -> Identity | None:
        row = await self.pool.fetchrow(_IDENTITY_SQL, key_hash)
        return identity_from_row(row) if row else None

    async def _share(self, key_hash: str, identity: Identity) -> None:
        """Put a Postgres answer in the Redis tier, indexed by org/env/key so a change can find it."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(_cache_key(key_hash), json.dumps(asdict(identity)), ex=self.redis_ttl_s)
                for kind, entity in (("org", identity.org_id), ("env", identity.env_id), ("key", identity.key_id)):
                    pipe.sadd(_dependents_key(kind, entity), key_hash)
                    pipe.expire(_dependents_key(kind, entity), self.redis_ttl_s * 2)
                await pipe.execute()
        except aioredis.RedisError as exc:
            log.warning("identity cache unavailable: %s", exc)

    async def invalidate(self, table: str, entity_id: str) -> None:
        self.clear_local()
        kind = {"orgs": "org", "environments": "env", "api_keys": "key"}.get(table)
        if kind is None or not entity_id:
            return
        try:
            deps = _dependents_key(kind, entity_id)
            hashes = await self.redis.smembers(deps)
            if hashes:
                await self.redis.delete(*(_cache_key(h.decode() if isinstance(h, bytes) else h) for h in hashes),
                                        deps)
        except aioredis.RedisError as exc:
            log.warning("could not invalidate shared identity cache: %s", exc)
        self.clear_local()  # anything refilled from Redis while the delete was in flight

    def clear_local(self) -> None:
        self._generation += 1
        self._local.clear()

    async def forget_shared(self) -> None:
        """Drops every identity in the shared Redis tier: after the change feed was down, a revocation may
        have been missed by every replica (all of them lose their LISTEN when Postgres restarts), and the
        shared tier would serve the old state for its whole TTL. The next lookups read Postgres."""
        self.clear_local()
        try:
            batch = []
            async for name in self.redis.scan_iter(match="clp:idcache*", count=1000):
                batch.append(name)
                if len(batch) >= 1000:
                    await self.redis.unlink(*batch)
                    batch.clear()
            if batch:
                await self.redis.unlink(*batch)
        except aioredis.RedisError as exc:
            log.warning("could not clear the shared identity cache after a change-feed outage: %s", exc)
        self.clear_local()  # anything refilled from Redis meanwhile


async def follow_tenancy_changes(database_url: str, resolver: IdentityResolver,
                                 on_catalogue_change: Callable[[], None] | None = None) -> None:
    """LISTEN for tenancy changes forever; reconnects, and clears local caches after every reconnect."""
    pending: set[asyncio.Task] = set()

    def on_notify(channel: str, payload: str) -> None:
        if channel != TENANCY_CHANNEL:
            if on_catalogue_change is not None:
                on_catalogue_change()
            return
        table, _, entity_id = payload.partition(":")
        resolver.clear_local()  # synchronously: no request may see the old state after this
        task = asyncio.ensure_future(resolver.invalidate(table, entity_id))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_connected() -> None:
        # Also at the first connect: while this process was down (or starting), nobody may have listened.
        resolver.clear_local()
        task = asyncio.ensure_future(resolver.forget_shared())
        pending.add(task)
        task.add_done_callback(pending.discard)
        if on_catalogue_change is not None:
            on_catalogue_change()

    await follow_notifications(database_url, [TENANCY_CHANNEL, ROUTING_CHANNEL], on_notify, on_connected,
                               "tenancy change feed", on_lost=resolver.clear_local)
