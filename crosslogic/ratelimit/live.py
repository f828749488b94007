"""Live limiter state in Redis for one key's layers (`crosslogic limits usage`): bucket levels, concurrency
leases held, tokens charged, quota counters. Read-only: nothing here changes a bucket.

Key names come from the engine (`Scope.keys`: the reservation, then bucket hash, lease set and charged
counter per layer) and from `quota.quota_keys`. The fields inside a bucket hash are the ones
scripts/reserve.lua writes (level and last update per limit kind); the tests compare this reader with the
levels the engine itself reports, so a change of that layout fails there rather than showing wrong numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime

import redis.asyncio as aioredis

from crosslogic.ratelimit.buckets import Bucket, BucketState, refill
from crosslogic.ratelimit.engine import BUCKET_KINDS, WINDOW_MS, Scope, lane_scope, platform_scope, tenant_scope
from crosslogic.ratelimit.explain import Reading
from crosslogic.ratelimit.limits import LayerLimits
from crosslogic.ratelimit.quota import quota_keys

# (level field, last-update field) per kind, as scripts/reserve.lua stores them.
BUCKET_FIELDS = {"tokens_per_sec": (b"s", b"st"), "tokens_per_min": (b"m", b"mt"),
                 "requests_per_min": (b"r", b"rt"), "tokens_per_day": (b"d", b"dt")}


@dataclass(frozen=True)
class BucketLevel:
    kind: str
    capacity: int
    level: int  # refilled to now; negative = debt from a settlement that charged more than was reserved


@dataclass(frozen=True)
class LayerUsage:
    layer: str
    ident: str
    buckets: tuple[BucketLevel, ...]
    leases: int | None  # requests in flight; None where no concurrency limit applies (then none are tracked)
    concurrency: int | None
    charged: int  # tokens settled to this layer instance: once every request settled, the ledger's total


@dataclass(frozen=True)
class QuotaUsage:
    level: str
    period: str  # "day" / "hour" (UTC)
    used: int
    quota: int | None


@dataclass(frozen=True)
class Usage:
    layers: tuple[LayerUsage, ...]
    quotas: tuple[QuotaUsage, ...]

    def as_json(self) -> dict:
        return {"layers": [asdict(u) for u in self.layers], "quotas": [asdict(q) for q in self.quotas]}


def bucket_level(kind: str, capacity: int, fields: dict[bytes, bytes], now_ms: int) -> BucketLevel:
    level_field, at_field = BUCKET_FIELDS[kind]
    bucket = Bucket(capacity, WINDOW_MS[kind])
    if level_field not in fields:  # never used, or expired once full again
        return BucketLevel(kind, capacity, capacity)
    state = BucketState(float(fields[level_field]), int(fields[at_field]))
    return BucketLevel(kind, capacity, math.floor(refill(bucket, state, now_ms)))  # as the engine reports it


async def scope_usage(redis: aioredis.Redis, scope: Scope, limits: tuple[LayerLimits, ...],
                      now_ms: int) -> list[LayerUsage]:
    keys = scope.keys("")[1:]  # skip the (per-request) reservation key
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(len(scope.layers)):
            buckets, leases, charged = keys[3 * i:3 * i + 3]
            pipe.hgetall(buckets)
            pipe.zcount(leases, f"({now_ms}", "+inf")  # a lease scored at or before now has expired
            pipe.get(charged)
        out = await pipe.execute()
    usage = []
    for i, ((layer, ident), layer_limits) in enumerate(zip(scope.layers, limits, strict=True)):
        fields, leases, charged = out[3 * i:3 * i + 3]
        levels = tuple(bucket_level(kind, getattr(layer_limits, kind), fields, now_ms)
                       for kind in BUCKET_KINDS if getattr(layer_limits, kind))
        limited = layer_limits.concurrency is not None
        usage.append(LayerUsage(layer, ident, levels, int(leases) if limited else None, layer_limits.concurrency,
                                int(charged or 0)))
    return usage


async def key_usage(redis: aioredis.Redis, ids: dict[str, str], region: str, reading: Reading, now_ms: int,
                    now: datetime) -> Usage:
    """The key's tenant layers, its org's reserved lane (if any) and the platform layers of its region (if
    limited), and the quota counters of its env and org for the current UTC day and hour."""
    org, env, key = ids["org"], ids["env"], ids["key"]
    layers = await scope_usage(redis, tenant_scope(org, env, key), reading.tenant.layers(), now_ms)
    lane = reading.tenant.lane()
    if lane is not None:
        layers += await scope_usage(redis, lane_scope(org), (lane,), now_ms)
    if reading.platform.limited(region):
        layers += await scope_usage(redis, platform_scope(region), reading.platform.for_region(region), now_ms)
    counters = await redis.mget(quota_keys(org, env, now))
    periods = {"d": "day", "h": "hour"}
    quotas = tuple(QuotaUsage(level, periods[period], int(used or 0), quota)
                   for (level, period, quota), used in zip(reading.quotas.limits(), counters, strict=True))
    return Usage(tuple(layers), quotas)
