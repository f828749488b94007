"""The limiter: reserve at admission, settle after the request, in Redis via two Lua scripts.

Key scheme: a *scope* is the set of layers one script call decides atomically; all its keys share one
hash tag, so they live in one Redis Cluster slot. The tenant scope (`{o:<org_id>}`: org, env, key) and
an org's reserved lane (`{o:<org_id>}`, reservation named apart) are per org; the platform scope
(`{g}`: global, region) is shared by everyone and is a separate call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from crosslogic.ratelimit.limits import LAYERS, LayerLimits, TenantLimits

Clock = Callable[[], int]  # milliseconds
KINDS = ("tokens_per_sec", "tokens_per_min", "requests_per_min", "tokens_per_day", "concurrency")
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
    """Total tokens charged to one layer instance (reservations, corrected by settlements)."""
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

    def tightest(self, kind: str) -> BucketView | None:
        views = [b for b in self.buckets if b.kind == kind]
        return min(views, key=lambda b: (b.level, b.capacity)) if views else None


def _slot(scope: Scope, slot: int) -> tuple[str | None, str | None]:
    if slot <= 0:
        return None, None
    layer, kind = divmod(slot - 1, len(KINDS))
    return scope.layers[layer][0], KINDS[kind]


def _script(name: str) -> str:
    return (resources.files("crosslogic.ratelimit") / "scripts" / name).read_text()


class LuaScript:
    """EVALSHA, loading the script again when Redis answers NOSCRIPT (e.g. after a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None

    async def __call__(self, redis: aioredis.Redis, keys: list[str], args: list) -> list:
        if self.sha is None:
            self.sha = await redis.script_load(self.source)
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


class Limiter:
    def __init__(self, redis: aioredis.Redis, clock: Clock = wall_clock_ms,
                 reservation_ttl_ms: int = DEFAULT_RESERVATION_TTL_MS) -> None:
        self.redis = redis
        self.clock = clock
        self.reservation_ttl_ms = reservation_ttl_ms
        self._reserve = LuaScript(_script("reserve.lua"))
        self._settle = LuaScript(_script("settle.lua"))

    def reserve_command(self, scope: Scope, request_id: str, tokens: int,
                        limits: tuple[LayerLimits, ...]) -> tuple[str, list[str], list]:
        """(script source, KEYS, ARGV) of one reservation (what reserve_scope sends; bench pipelines it)."""
        args: list = [self.clock(), request_id, self.reservation_ttl_ms, max(0, tokens)]
        for layer in limits:
            args += [layer.tokens_per_sec or 0, layer.tokens_per_min or 0, layer.requests_per_min or 0,
                     layer.tokens_per_day or 0, layer.concurrency or 0, 1 if layer.shadow else 0]
        return self._reserve.source, scope.keys(request_id), args

    async def reserve_scope(self, scope: Scope, request_id: str, tokens: int,
                            limits: tuple[LayerLimits, ...]) -> Decision:
        _, keys, args = self.reserve_command(scope, request_id, tokens, limits)
        out = await self._reserve(self.redis, keys, args)
        status, failed, retry, shadow = (int(v) for v in out[:4])
        if status == 2:
            return Decision(admitted=True, repeated=True)
        views = []
        for i, layer in enumerate(limits):
            for b, kind in enumerate(BUCKET_KINDS):
                capacity = getattr(layer, kind)
                if capacity:
                    views.append(BucketView(scope.layers[i][0], kind, capacity, int(out[4 + i * 4 + b])))
        layer_name, kind = _slot(scope, failed)
        shadow_layer, shadow_kind = _slot(scope, shadow)
        return Decision(admitted=status == 1, retry_after_ms=retry, layer=layer_name, kind=kind,
                        shadow_layer=shadow_layer, shadow_kind=shadow_kind, buckets=tuple(views))

    async def settle_scope(self, scope: Scope, request_id: str, actual_tokens: int, rollback: bool = False) -> bool:
        """Refund or debit the difference to the reservation; False if already settled, expired or
        never made in this scope. actual_tokens < 0 charges what was reserved (usage unknown);
        rollback (a later scope refused the request) also gives its request slots back."""
        out = await self._settle(self.redis, scope.keys(request_id),
                                 [self.clock(), request_id, max(-1, actual_tokens), "1" if rollback else "0"])
        return int(out[0]) == 1

    async def settle_scopes(self, settlements: list[tuple[Scope, str, int]]) -> list[bool]:
        """Many settle_scope calls in one pipelined round trip (the accounting sink settles in batches)."""
        if not settlements:
            return []
        script = self._settle
        if script.sha is None:
            script.sha = await self.redis.script_load(script.source)
        now = self.clock()
        for attempt in range(2):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for scope, request_id, actual in settlements:
                        keys = scope.keys(request_id)
                        pipe.evalsha(script.sha, len(keys), *keys, now, request_id, max(-1, actual), "0")
                    results = await pipe.execute()
                return [int(out[0]) == 1 for out in results]
            except NoScriptError:  # Redis restarted without its script cache; settling twice is a no-op
                if attempt:
                    raise
                script.sha = await self.redis.script_load(script.source)
        raise AssertionError("unreachable")

    async def reserve(self, org_id: str, env_id: str, key_id: str, request_id: str, tokens: int,
                      limits: TenantLimits) -> Decision:
        return await self.reserve_scope(tenant_scope(org_id, env_id, key_id), request_id, tokens, limits.layers())

    async def settle(self, org_id: str, env_id: str, key_id: str, request_id: str, actual_tokens: int) -> bool:
        return await self.settle_scope(tenant_scope(org_id, env_id, key_id), request_id, actual_tokens)

    async def charged(self, org_id: str, layer: str, ident: str) -> int:
        value = await self.redis.get(charged_key(org_id, layer, ident))
        return int(value or 0)
