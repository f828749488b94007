"""One view per API key of everything ext_authz decides with: identity, statuses, region, allowed models, rate
limits, quotas and per-request caps, bill-cap terms and the month's owed amount. One Postgres query per key
(a join), one cache, one invalidation path.

Why one view: the decision used to go through five readers (identity with a process LRU and a shared Redis
tier, per-key limits, quotas per environment, bill caps, the catalogue), each with its own cache, TTL and
change feed; a request cost up to three cache lookups and a key's first request up to five queries.

How it stays right:
- **One LISTEN loop** (`follow_changes`) on the tenancy, limits, routing and prices channels. A tenancy row
  change (`orgs:<id>`, `environments:<id>`, `api_keys:<id>`) drops the views of that org / env / key at once,
  synchronously in the notification callback, so no request after it sees the old state (plus every cached
  "unknown key" on any api_keys change: a new key's INSERT must be found). A plan-default or layer-policy
  change drops every view; global and region limits drop the platform snapshot; models, nodes and regions mark
  the catalogue stale, price versions the bill cap's price book.
- **One generation counter**: every invalidation bumps it and forgets the loads in flight; a load stores what it
  read only if no invalidation happened meanwhile, so an in-flight load cannot refill stale state.
- **Reconnect clears everything** (also the first connect): notifications sent while nobody listened are lost.
  While the feed is down the cached views keep serving (nothing can be revoked while Postgres is away; a lost
  LISTEN connection alone is back within 0.1–2 s, then cleared).
- **No shared Redis tier** (measured, bench/authz_decide.py and docs/architecture.md): a key's first request
  on a replica costs one indexed join; the tier saved little over that and needed its own invalidation, a
  SCAN-and-delete after every feed outage and a documented race (a replica could re-share a row read just
  before a revocation). Each replica's view now depends only on its own LISTEN.
- A view is served for `ttl_s`, then re-read in the background while it keeps serving (a capped org's every
  `capped_ttl_s`, so its owed amount is at most that old), and must be re-read before use after twice that.
  When Postgres cannot be read, the last view of a key is served, however old; a key never seen gets 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from crosslogic.contract import LIMITS_CHANNEL, PRICES_CHANNEL, ROUTING_CHANNEL, TENANCY_CHANNEL
from crosslogic.extauthz.billcap import CAP_COLUMNS, CAP_JOIN, Cap
from crosslogic.ratelimit.limits import PlatformLimits, TenantLimits
from crosslogic.ratelimit.money import month_of
from crosslogic.ratelimit.quota import QUOTA_COLUMNS, Quotas
from crosslogic.ratelimit.store import TENANT_JOINS, TENANT_LIMIT_COLUMNS, load_platform, tenant_limits
from crosslogic.store.db import POSTGRES_UNAVAILABLE, follow_notifications

log = logging.getLogger("crosslogic.extauthz")

IDENTITY_COLUMNS = """
k.key_id::text AS key_id, k.org_id::text AS org_id, k.env_id::text AS env_id,
k.status AS key_status, e.status AS env_status, o.status AS org_status,
COALESCE(k.region, e.region, o.region_preferences ->> 0) AS region, e.model_list AS env_models,
extract(epoch FROM k.expires_at)::float8 AS key_expires_at, k.mode AS key_mode
"""
# $1 = the key's HMAC, $2 = the current UTC month (for the bill cap's owed amount).
TENANT_VIEW_SQL = (f"SELECT {IDENTITY_COLUMNS}, {TENANT_LIMIT_COLUMNS}, {QUOTA_COLUMNS}, {CAP_COLUMNS} "
                   f"FROM {TENANT_JOINS} {CAP_JOIN.format(month='$2')} WHERE k.key_hash = $1")
# Tables whose limits NOTIFY (statement level, no row id) is covered by their own tenancy NOTIFY (row level, id).
_TENANCY_TABLES = {"orgs": "o:", "environments": "e:", "api_keys": "k:"}
_PLATFORM_TABLES = frozenset({"global_limits", "regions"})


@dataclass(frozen=True, slots=True)
class TenantView:
    key_id: str
    org_id: str
    env_id: str
    key_status: str
    env_status: str
    org_status: str
    region: str | None  # the key's, else the env's, else the org's first preference
    allowed_models: frozenset[str]  # empty = every active model
    limits: TenantLimits
    quotas: Quotas
    cap: Cap | None  # None: the org has no monthly bill cap
    key_expires_at: float | None = None  # Unix time the key stops working (expiry, rotation overlap); None = never
    test: bool = False  # a test key (migration 012): free, so never held against the org's bill cap


def _json_list(value: object) -> list:
    if isinstance(value, str):
        value = json.loads(value)
    return list(value) if isinstance(value, list) else []


def view_from_row(row: asyncpg.Record, month: object) -> TenantView:
    return TenantView(
        key_id=row["key_id"], org_id=row["org_id"], env_id=row["env_id"], key_status=row["key_status"],
        env_status=row["env_status"], org_status=row["org_status"], region=row["region"],
        allowed_models=frozenset(_json_list(row["env_models"])), limits=tenant_limits(row),
        quotas=Quotas.from_row(row), key_expires_at=row["key_expires_at"], test=row["key_mode"] == "test",
        # A test key's usage is priced 0 and never owed: nothing to reserve, and a capped org's test keys keep
        # working after the cap is reached (their limits come from test_key_limits instead).
        cap=None if row["key_mode"] == "test" else Cap.from_row(row, month))


class TenantCache:
    """Per-key views by key hash, the platform limits snapshot, and the invalidation that keeps both right."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float = 10.0, capped_ttl_s: float = 1.0,
                 max_views: int = 100_000, max_unknown: int = 10_000, retry_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.capped_ttl_s = min(capped_ttl_s, ttl_s)
        self.max_views = max_views
        self.max_unknown = max_unknown
        self.retry_s = retry_s  # a failed background re-read is tried again after this long
        self.clock = clock
        self.wall_clock = wall_clock
        self.generation = 0  # bumped by every invalidation
        self._views: dict[str, tuple[TenantView, float]] = {}  # key hash -> (view, when to re-read it)
        self._unknown: dict[str, float] = {}  # key hashes Postgres does not know -> when to ask again
        self._dependents: dict[str, set[str]] = {}  # "o:<org>", "e:<env>", "k:<key>" -> key hashes
        self._loads: dict[str, asyncio.Task] = {}  # key hash -> the load in flight (one per key)
        self._platform: PlatformLimits | None = None
        self._platform_load: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # every load still running, for aclose
        self.loads = 0  # Postgres reads of a view (tests and the bench count them)

    # --- the request path ---------------------------------------------------------------------------------------
    async def view(self, key_hash: str) -> TenantView | None:
        """The key's view, None for a key Postgres does not know. One dict lookup when cached."""
        entry = self._views.get(key_hash)
        if entry is not None:
            now = self.clock()
            if entry[1] > now:
                return entry[0]
            if entry[1] + self.ttl_s > now:  # due: re-read in the background, serve this one meanwhile
                if key_hash not in self._loads:
                    self._start_load(key_hash)
                return entry[0]
        elif self._unknown.get(key_hash, 0.0) > self.clock():
            return None
        return await self._load(key_hash)

    async def platform(self) -> PlatformLimits:
        """The global and region limits (one snapshot for every key), loaded on first use and after a change."""
        if self._platform is not None:
            return self._platform
        task = self._platform_load
        if task is None or task.done():
            task = self._platform_load = asyncio.ensure_future(self._read_platform(self.generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    # --- loading ------------------------------------------------------------------------------------------------
    def _start_load(self, key_hash: str) -> asyncio.Task:
        task = asyncio.ensure_future(self._read(key_hash, self.generation))
        self._loads[key_hash] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._load_done(key_hash, done))
        return task

    def _load_done(self, key_hash: str, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._loads.get(key_hash) is task:
            del self._loads[key_hash]
        if not task.cancelled() and task.exception() is not None:  # retrieved: nobody may be waiting for it
            log.debug("tenant view load failed: %s", task.exception())

    async def _load(self, key_hash: str) -> TenantView | None:
        task = self._loads.get(key_hash) or self._start_load(key_hash)
        # Shielded: a caller that gives up (Envoy's timeout) does not cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _read(self, key_hash: str, generation: int) -> TenantView | None:
        self.loads += 1
        month = month_of(self.wall_clock())
        try:
            row = await self.pool.fetchrow(TENANT_VIEW_SQL, key_hash, month)
        except POSTGRES_UNAVAILABLE as exc:
            entry = self._views.get(key_hash)
            if entry is None:
                raise
            log.warning("tenant view not re-read (%s); serving the last known one", exc)
            if generation == self.generation:
                self._views[key_hash] = (entry[0], self.clock() + self.retry_s)
            return entry[0]
        view = view_from_row(row, month) if row is not None else None
        if generation == self.generation:  # no invalidation since the read began: what it read is current
            self._store(key_hash, view)
        return view

    async def _read_platform(self, generation: int) -> PlatformLimits:
        try:
            platform = await load_platform(self.pool)
        except POSTGRES_UNAVAILABLE:
            if self._platform is None:
                raise
            return self._platform
        if generation == self.generation:
            self._platform = platform
        return platform

    def _store(self, key_hash: str, view: TenantView | None) -> None:
        now = self.clock()
        if view is None:
            self._forget(key_hash)
            self._unknown[key_hash] = now + self.ttl_s
            while len(self._unknown) > self.max_unknown:
                del self._unknown[next(iter(self._unknown))]
            return
        self._unknown.pop(key_hash, None)
        self._forget(key_hash)  # re-inserted at the end: eviction takes the longest-unrefreshed first
        self._views[key_hash] = (view, now + (self.capped_ttl_s if view.cap is not None else self.ttl_s))
        for dependent in ("o:" + view.org_id, "e:" + view.env_id, "k:" + view.key_id):
            self._dependents.setdefault(dependent, set()).add(key_hash)
        while len(self._views) > self.max_views:
            self._forget(next(iter(self._views)))

    def _forget(self, key_hash: str) -> None:
        entry = self._views.pop(key_hash, None)
        if entry is None:
            return
        view = entry[0]
        for dependent in ("o:" + view.org_id, "e:" + view.env_id, "k:" + view.key_id):
            hashes = self._dependents.get(dependent)
            if hashes is not None:
                hashes.discard(key_hash)
                if not hashes:
                    del self._dependents[dependent]

    # --- invalidation -------------------------------------------------------------------------------------------
    def _invalidated(self) -> None:
        self.generation += 1
        self._loads.clear()  # later requests start their own load; the old ones finish for their own callers
        self._platform_load = None

    def tenancy_changed(self, table: str, entity_id: str) -> None:
        """A row of orgs / environments / api_keys changed (its NOTIFY payload `table:id`)."""
        self._invalidated()
        prefix = _TENANCY_TABLES.get(table)
        if prefix is None or not entity_id:
            self.clear()
            return
        for key_hash in tuple(self._dependents.get(prefix + entity_id, ())):
            self._forget(key_hash)
        if table == "api_keys":
            self._unknown.clear()

    def limits_changed(self, table: str) -> None:
        """A limit column or policy changed (the crosslogic_limits payload names the table)."""
        if table in _TENANCY_TABLES:
            return  # the same statement's row notifications on the tenancy channel name each row
        self._invalidated()
        self._platform = None
        if table not in _PLATFORM_TABLES:  # plan defaults, layer policy: part of every view
            self._views.clear()
            self._dependents.clear()

    def clear(self) -> None:
        """Everything, e.g. after the change feed reconnected."""
        self._invalidated()
        self._views.clear()
        self._unknown.clear()
        self._dependents.clear()
        self._platform = None

    async def aclose(self) -> None:
        """Cancels the loads still running (the pool closes after this)."""
        self._invalidated()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def follow_changes(database_url: str, views: TenantCache, on_catalogue_change: Callable[[], None],
                         on_prices_change: Callable[[], None],
                         follow: Callable[..., Awaitable[None]] = follow_notifications) -> None:
    """The one LISTEN loop of ext_authz, until cancelled: every cache it holds is invalidated from here."""
    def on_notify(channel: str, payload: str) -> None:
        if channel == TENANCY_CHANNEL:
            table, _, entity_id = payload.partition(":")
            views.tenancy_changed(table, entity_id)
        elif channel == LIMITS_CHANNEL:
            views.limits_changed(payload)
        elif channel == ROUTING_CHANNEL:
            on_catalogue_change()
        elif channel == PRICES_CHANNEL:
            on_prices_change()

    def on_connected() -> None:
        views.clear()
        on_catalogue_change()
        on_prices_change()

    await follow(database_url, [TENANCY_CHANNEL, LIMITS_CHANNEL, ROUTING_CHANNEL, PRICES_CHANNEL], on_notify,
                 on_connected, "change feed")
