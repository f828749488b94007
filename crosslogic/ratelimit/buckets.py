"""Token-bucket maths, pure. `scripts/reserve.lua` and `scripts/settle.lua` do exactly these steps.

Why token buckets (and not sliding windows): a bucket is two numbers per limit (level, last update),
refills continuously so there is no burst at window edges, and -- what two-phase accounting needs -- it
can be *adjusted* after the fact: a settlement refunds the unused part of a reservation or debits the
excess, which may take the level below zero (debt that later requests wait out). A sliding-window log
would have to store every request; a sliding-window counter cannot take a refund exactly.

Levels are IEEE doubles in both Python and Lua, computed with the same operations in the same order, so
the property tests can compare the scripts against this model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    capacity: int  # tokens (or requests) that may be spent per window
    window_ms: int  # the bucket refills from empty to full in this time


@dataclass(frozen=True)
class BucketState:
    level: float  # may be negative: debt from a settlement that debited more than was reserved
    at_ms: int


def full(bucket: Bucket, now_ms: int) -> BucketState:
    return BucketState(float(bucket.capacity), now_ms)


def refill(bucket: Bucket, state: BucketState, now_ms: int) -> float:
    elapsed = max(0, now_ms - state.at_ms)
    level = state.level + elapsed * bucket.capacity / bucket.window_ms
    return min(float(bucket.capacity), level)


def cost_in(bucket: Bucket, amount: int) -> int:
    """What a reservation of `amount` takes from this bucket: never more than a full bucket, so a
    large request waits for a full bucket instead of being refused for ever."""
    return min(amount, bucket.capacity)


def wait_ms(bucket: Bucket, level: float, cost: int) -> int:
    """Milliseconds until the bucket holds `cost` (0 when it already does)."""
    if level >= cost:
        return 0
    return math.ceil((cost - level) * bucket.window_ms / bucket.capacity)


def take(bucket: Bucket, state: BucketState, now_ms: int, amount: int) -> tuple[bool, BucketState, int]:
    """(admitted, new state, retry-after ms). A refused take changes nothing."""
    level = refill(bucket, state, now_ms)
    cost = cost_in(bucket, amount)
    if level < cost:
        return False, state, wait_ms(bucket, level, cost)
    return True, BucketState(level - cost, now_ms), 0


def adjust(bucket: Bucket, state: BucketState, now_ms: int, delta: int) -> BucketState:
    """Settlement: delta > 0 refunds (never above capacity), delta < 0 debits (may go below zero)."""
    level = refill(bucket, state, now_ms) + delta
    return BucketState(min(float(bucket.capacity), level), now_ms)


def ms_until_full(bucket: Bucket, level: float) -> int:
    return wait_ms(bucket, level, bucket.capacity)
