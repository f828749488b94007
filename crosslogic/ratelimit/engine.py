"""The limiter: reserve at admission, settle after the request, in Redis via two Lua scripts.

Key scheme: a *scope* is a group of layers with one hash tag, so its keys live in one Redis Cluster
slot. The tenant scope (`{o:<org_id>}`: org, env, key) and an org's reserved lane (`{o:<org_id>}`,
reservation named apart) are per org; the platform scope (`{g}`: global, region) is shared by everyone.

On one Valkey (the default) a request's scopes are decided in ONE script call, atomically: the
admission costs one round trip and one script run whatever the number of layers (bench/limiter.py).
On Redis Cluster (`split_scopes=True`) each scope is its own call and a later scope's refusal rolls the
earlier ones back (admission.py); the scripts are the same.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from crosslogic.contract import LIMIT_KINDS
from crosslogic.ratelimit.batching import ScriptBatcher
from crosslogic.ratelimit.limits import LAYERS, LayerLimits, TenantLimits
from crosslogic.ratelimit.lua import LuaScript, cluster_calls, on_cluster, script_source
from crosslogic.ratelimit.resp import Encoded, ScriptClient
from crosslogic.ratelimit.resp_cluster import ClusterScriptClient
from crosslogic.settings import Settings

Clock = Callable[[], int]  # milliseconds
KINDS = LIMIT_KINDS
BUCKET_KINDS = KINDS[:4]
WINDOW_MS = {"tokens_per_sec": 1_000, "tokens_per_min": 60_000, "requests_per_min": 60_000,
             "tokens_per_day": 86_400_000}
DEFAULT_RESERVATION_TTL_MS = 15 * 60_000  # longer than any request may run; then it expires on its own


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def org_tag(org_id: str) -> str:
    return "{o:" + org_id + "}"


@dataclass(frozen=True)
class Scope:
    """Layers decided together by one script call; every key carries the same hash tag."""

    name: str  # names the reservation apart from other scopes' in the same slot
    tag: str
    layers: tuple[tuple[str, str], ...]  # (layer, instance id)

    def keys(self, request_id: str) -> list[str]:
        """KEYS for both scripts: the reservation, then 3 per layer (buckets hash, leases, charged)."""
        keys = [f"{self.tag}:res:{self.name}:{request_id}"]
        for layer, ident in self.layers:
            base = f"{self.tag}:{layer}:{ident}"
            keys += [f"{base}:b", f"{base}:lease", f"{base}:charged"]
        return keys


def tenant_scope(org_id: str, env_id: str, key_id: str) -> Scope:
    return Scope("t", org_tag(org_id), tuple(zip(LAYERS, (org_id, env_id, key_id), strict=True)))


def lane_scope(org_id: str) -> Scope:
    """An org's reserved capacity: traffic within it bypasses the platform scope."""
    return Scope("lane", org_tag(org_id), (("lane", org_id),))


def platform_scope(region: str) -> Scope:
    return Scope("g", "{g}", (("global", "all"), ("region", region)))


def request_keys(org_id: str, env_id: str, key_id: str, request_id: str) -> list[str]:
    return tenant_scope(org_id, env_id, key_id).keys(request_id)


def charged_key(org_id: str, layer: str, ident: str) -> str:
    """Tokens charged to one layer instance by settlements: once every request settled, the ledger's total."""
    return f"{org_tag(org_id)}:{layer}:{ident}:charged"


@dataclass(frozen=True)
class BucketView:
    layer: str
    kind: str
    capacity: int
    level: int  # after this decision

    @property
    def reset_ms(self) -> int:
        if self.level >= self.capacity:
            return 0
        return -(-(self.capacity - self.level) * WINDOW_MS[self.kind] // self.capacity)


@dataclass(frozen=True)
class Decision:
    admitted: bool
    retry_after_ms: int = 0
    layer: str | None = None  # the refusing layer
    kind: str | None = None  # which of its limits
    shadow_layer: str | None = None  # a shadow-mode limit that would have refused
    shadow_kind: str | None = None
    buckets: tuple[BucketView, ...] = ()
    repeated: bool = False  # this request id was already reserved
    degraded: bool = False  # decided without Redis (failure policy)
    leases: int = 0  # concurrency leases taken (settlement frees them)
    # One of them leaves its set at least half full: the response's end should free them (release_leases), since a
    # lease left to settlement lingers after its response (reserve.lua says why half).
    release_early: bool = False

    def tightest(self, kind: str) -> BucketView | None:
        views = [b for b in self.buckets if b.kind == kind]
        return min(views, key=lambda b: (b.level, b.capacity)) if views else None


NEED, LANE, SHARED, SKIP = "need", "lane", "shared", "skip"  # a stage's role (see reserve.lua)
# What settle.lua found: the reservation (settled now), nothing at all (first sight of the request id:
# admitted without a reservation, e.g. fail-open while Redis was down, or the reservation expired), or
# the tombstone of an earlier settlement (a replayed log entry).
ALREADY_SETTLED, SETTLED, UNRESERVED = 0, 1, 2
REFUSED, ADMITTED, REPEATED = 0, 1, 2  # reserve.lua's status: REPEATED = reserved or settled before


@dataclass(frozen=True)
class Stage:
    """One scope of an admission with the limits of its layers and its role."""

    scope: Scope
    limits: tuple[LayerLimits, ...]
    role: str = NEED


def _layer_args(layer: LayerLimits) -> list[int]:
    return [layer.tokens_per_sec or 0, layer.tokens_per_min or 0, layer.requests_per_min or 0,
            layer.tokens_per_day or 0, layer.concurrency or 0, layer.shadow_mask()]


def stage_keys(scopes: Sequence[Scope], request_id: str) -> list[str]:
    """KEYS of a call over these scopes: the first scope's reservation, then 3 per layer of every scope."""
    keys = scopes[0].keys(request_id)
    for scope in scopes[1:]:
        keys += scope.keys(request_id)[1:]
    return keys


ScriptCall = Callable[[list, list], Awaitable[list]]


@dataclass(frozen=True)
class ReservePlan:
    """One reservation call over some stages with everything but the request id, the clock and the tokens worked
    out (and, for the lean client, encoded) once: a tenant's plan is reused for all its requests until its limits
    change (`Limiter.plan`)."""

    stages: tuple[Stage, ...]
    reservation_prefix: str  # the reservation key, less the request id
    keys: tuple  # KEYS after the reservation's (one Encoded run for the lean client)
    args: tuple  # ARGV after the five per-request values (likewise)
    names: tuple[str, ...]  # layer names, in the scripts' order
    buckets: tuple[tuple[int, str, str, int], ...]  # (reply index, layer, kind, capacity) of the tenant's buckets
    leases_at: int  # reply index of the leases taken


class Limiter:
    """`scripts`: the per-request calls (reserve, release) go through this lean client (resp.py: what the
    services use, measured cheaper); without it through redis-py, coalesced by ScriptBatcher. Batched settlement
    (`settle_many`) also goes through it when given (the accounting service: measured its largest cost in redis-py);
    the operator reads always use redis-py."""

    def __init__(self, redis: aioredis.Redis, clock: Clock = wall_clock_ms,
                 reservation_ttl_ms: int = DEFAULT_RESERVATION_TTL_MS, lease_ttl_ms: int | None = None,
                 split_scopes: bool = False, scripts: ScriptClient | ClusterScriptClient | None = None,
                 concurrency_wait_ms: int = 0) -> None:
        self.redis = redis
        # How long admission waits for a full concurrency set to free a slot before refusing (admission.admit).
        self.concurrency_wait_ms = concurrency_wait_ms
        self.clock = clock
        self.reservation_ttl_ms = reservation_ttl_ms
        # A concurrency lease outlives any request; a shorter TTL than the reservation's frees the slot
        # of a request whose settlement was lost sooner (tokens stay reserved until the reservation ends).
        self.lease_ttl_ms = min(lease_ttl_ms or reservation_ttl_ms, reservation_ttl_ms)
        self.split_scopes = split_scopes  # Redis Cluster: one call per scope (admission.py)
        self._reserve = LuaScript(script_source("reserve.lua"))
        self._settle = LuaScript(script_source("settle.lua"))
        self._release = LuaScript(script_source("release.lua", prelude=None))
        self._reserve_call: ScriptCall
        self._release_call: ScriptCall
        self._encode = scripts is not None
        self.scripts = scripts
        self._plans: dict[tuple, tuple[object, object, ReservePlan]] = {}  # see plan()
        if scripts is not None:
            self._reserve_call = partial(scripts.evalsha, self._reserve, durable=True)  # WAIT on a replicated Redis
            self._release_call = partial(scripts.evalsha, self._release)
        else:  # concurrent admissions share round trips
            self._reserve_call = ScriptBatcher(redis, self._reserve)
            self._release_call = ScriptBatcher(redis, self._release)

    def reserve_command(self, stages: Sequence[Stage], request_id: str, tokens: int) -> tuple[str, list[str], list]:
        """(script source, KEYS, ARGV) of one reservation (what reserve_stages sends; the bench pipelines it)."""
        args: list = [self.clock(), request_id, self.reservation_ttl_ms, self.lease_ttl_ms, max(0, tokens)]
        for stage in stages:
            args += [stage.role, len(stage.limits)]
            for layer in stage.limits:
                args += _layer_args(layer)
        return self._reserve.source, stage_keys([s.scope for s in stages], request_id), args

    def build_plan(self, stages: Sequence[Stage]) -> ReservePlan:
        keys = stage_keys([s.scope for s in stages], "")
        args: list = []
        for stage in stages:
            args += [stage.role, len(stage.limits)]
            for layer in stage.limits:
                args += _layer_args(layer)
        names = tuple(layer for stage in stages for layer, _ in stage.scope.layers)
        buckets = tuple((4 + i * 4 + b, names[i], kind, getattr(layer, kind))
                        for i, layer in enumerate(stages[0].limits)
                        for b, kind in enumerate(BUCKET_KINDS) if getattr(layer, kind))
        fixed_keys, fixed_args = tuple(keys[1:]), tuple(args)
        if self._encode:
            fixed_keys, fixed_args = (Encoded(fixed_keys),), (Encoded(fixed_args),)
        return ReservePlan(tuple(stages), keys[0], fixed_keys, fixed_args, names, buckets,
                           4 + 4 * len(stages[0].limits))

    def plan(self, cache_key: tuple, limits: object, platform: object, build: Callable[[], Sequence[Stage]],
             max_plans: int = 100_000) -> ReservePlan:
        """The plan of `cache_key` (a tenant and region) made from these limits objects, built once: it is rebuilt
        when either object is replaced (the tenant view or platform snapshot was re-read)."""
        hit = self._plans.get(cache_key)
        if hit is not None and hit[0] is limits and hit[1] is platform:
            return hit[2]
        plan = self.build_plan(build())
        self._plans.pop(cache_key, None)
        self._plans[cache_key] = (limits, platform, plan)
        while len(self._plans) > max_plans:
            del self._plans[next(iter(self._plans))]
        return plan

    async def reserve_stages(self, stages: Sequence[Stage], request_id: str, tokens: int) -> Decision:
        """One atomic decision over the stages; the buckets reported are the first stage's (the tenant's)."""
        return await self.reserve_plan(self.build_plan(stages), request_id, tokens)

    async def reserve_plan(self, plan: ReservePlan, request_id: str, tokens: int) -> Decision:
        out = await self._reserve_call(
            [plan.reservation_prefix + request_id, *plan.keys],
            [self.clock(), request_id, self.reservation_ttl_ms, self.lease_ttl_ms, max(0, tokens), *plan.args])
        status, failed, retry, shadow = int(out[0]), int(out[1]), int(out[2]), int(out[3])
        if status == REPEATED:
            return Decision(admitted=True, repeated=True, release_early=len(out) > 4 and int(out[4]) == 1)
        views = tuple(BucketView(layer, kind, capacity, int(out[at])) for at, layer, kind, capacity in plan.buckets)
        layer_name, kind = _slot(plan.names, failed)
        shadow_layer, shadow_kind = _slot(plan.names, shadow) if shadow else (None, None)
        leases = int(out[plan.leases_at]) if len(out) > plan.leases_at else 0
        early = len(out) > plan.leases_at + 1 and int(out[plan.leases_at + 1]) == 1
        return Decision(admitted=status == ADMITTED, retry_after_ms=retry, layer=layer_name, kind=kind,
                        shadow_layer=shadow_layer, shadow_kind=shadow_kind, buckets=views, leases=leases,
                        release_early=early)

    def _settle_args(self, request_id: str, actual_tokens: int, rollback: bool, now: int) -> list:
        return [now, request_id, max(-1, actual_tokens), "1" if rollback else "0"]

    async def settle_stages(self, scopes: Sequence[Scope], request_id: str, actual_tokens: int,
                            rollback: bool = False) -> bool:
        """Refund or debit the difference to the reservation made over these scopes (the same ones, in the
        same order); False if already settled, expired or never made. actual_tokens < 0 charges what was
        reserved (usage unknown); rollback (a later scope refused the request) also gives request slots back."""
        out = await self._settle(self.redis, stage_keys(scopes, request_id),
                                 self._settle_args(request_id, actual_tokens, rollback, self.clock()))
        return int(out[0]) == SETTLED

    async def settle_many(self, settlements: Sequence[tuple[Sequence[Scope], str, int]]) -> list[int]:
        """Many settle_stages calls in one pipelined round trip (the accounting sink settles in batches):
        per call SETTLED, UNRESERVED (first seen, nothing was reserved) or ALREADY_SETTLED."""
        if not settlements:
            return []
        script = self._settle
        now = self.clock()
        if self.scripts is not None:  # one write per primary; NOSCRIPT handled by the client (settling twice is a
            # no-op); durable: answered once the replicas have it (WAIT), so a failover cannot lose a settlement
            replies = await self.scripts.evalsha_many(script, [
                (stage_keys(scopes, request_id), self._settle_args(request_id, actual, False, now))
                for scopes, request_id, actual in settlements], durable=True)
            return [int(out[0]) for out in replies]
        if on_cluster(self.redis):
            calls = [(stage_keys(scopes, request_id), self._settle_args(request_id, actual, False, now))
                     for scopes, request_id, actual in settlements]
            return [int(out[0]) for out in await cluster_calls(self.redis, script, calls)]
        for attempt in range(2):
            sha = await script.load(self.redis, again=attempt > 0)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for scopes, request_id, actual in settlements:
                        keys = stage_keys(scopes, request_id)
                        pipe.evalsha(sha, len(keys), *keys, *self._settle_args(request_id, actual, False, now))
                    results = await pipe.execute()
                return [int(out[0]) for out in results]
            except NoScriptError:  # Redis restarted without its script cache; settling twice is a no-op
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def release_leases(self, scopes: Sequence[Scope], request_id: str) -> int:
        """Frees the concurrency leases of the reservation made over these scopes (the same ones, in the same
        order), leaving its tokens to settlement; idempotent. Returns how many leases were freed now."""
        return int(await self._release_call(stage_keys(scopes, request_id), [request_id]))

    async def reserve(self, org_id: str, env_id: str, key_id: str, request_id: str, tokens: int,
                      limits: TenantLimits) -> Decision:
        """The tenant scope alone (no platform layers); settle with `settle`."""
        return await self.reserve_stages([Stage(tenant_scope(org_id, env_id, key_id), limits.layers())],
                                         request_id, tokens)

    async def settle(self, org_id: str, env_id: str, key_id: str, request_id: str, actual_tokens: int) -> bool:
        return await self.settle_stages([tenant_scope(org_id, env_id, key_id)], request_id, actual_tokens)

    async def charged(self, org_id: str, layer: str, ident: str) -> int:
        value = await self.redis.get(charged_key(org_id, layer, ident))
        return int(value or 0)


def limiter_from_settings(redis: aioredis.Redis, settings: Settings,
                          scripts: ScriptClient | ClusterScriptClient | None = None) -> Limiter:
    return Limiter(redis, reservation_ttl_ms=settings.reservation_ttl_ms, lease_ttl_ms=settings.lease_ttl_ms,
                   split_scopes=settings.limiter_split_scopes or settings.redis_cluster, scripts=scripts,
                   concurrency_wait_ms=settings.concurrency_wait_ms)


def _slot(names: Sequence[str], slot: int) -> tuple[str | None, str | None]:
    if slot <= 0:
        return None, None
    layer, kind = divmod(slot - 1, len(KINDS))
    return names[layer], KINDS[kind]
