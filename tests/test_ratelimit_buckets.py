"""Token-bucket maths (pure) and the Lua scripts against it, on a real Valkey with a controlled clock."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from crosslogic.ratelimit import buckets as b
from crosslogic.ratelimit.engine import Limiter, request_keys
from crosslogic.ratelimit.limits import LayerLimits, TenantLimits
from crosslogic.ratelimit.quota import Quotas, exceeded

capacities = st.integers(min_value=1, max_value=10_000_000)
windows = st.sampled_from([1_000, 60_000, 86_400_000])
steps = st.lists(st.tuples(st.integers(0, 120_000), st.integers(0, 50_000)), min_size=1, max_size=40)


@given(capacities, windows, steps)
def test_admitted_tokens_never_exceed_capacity_plus_refill(capacity, window, ops):
    bucket = b.Bucket(capacity, window)
    state, now, admitted = b.full(bucket, 0), 0, 0
    for gap, amount in ops:
        now += gap
        ok, state, retry = b.take(bucket, state, now, amount)
        if ok:
            admitted += b.cost_in(bucket, amount)
            assert retry == 0 and state.level >= 0
        else:
            assert retry > 0
    assert admitted <= capacity + now * capacity / window + 1e-6 * capacity


@given(capacities, windows, st.floats(-1e7, 1e7), st.integers(0, 10**9), st.integers(0, 10**9))
def test_refill_is_monotonic_in_time_and_capped(capacity, window, level, t1, t2):
    bucket = b.Bucket(capacity, window)
    state = b.BucketState(min(level, capacity), 0)
    early, late = sorted((t1, t2))
    assert b.refill(bucket, state, early) <= b.refill(bucket, state, late) <= capacity


@given(capacities, windows, st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**6))
def test_waiting_the_retry_after_is_enough(capacity, window, spent, amount, start):
    bucket = b.Bucket(capacity, window)
    state = b.BucketState(float(capacity - min(spent, capacity)), start)
    ok, _, retry = b.take(bucket, state, start, amount)
    if not ok:
        assert retry > 0 and b.take(bucket, state, start + retry, amount)[0]
        assert not b.take(bucket, state, start + retry - 1, amount)[0]  # and not a millisecond less


@given(st.integers(1, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_reserve_then_settle_equals_charging_the_actual_usage(capacity, reserved, actual):
    bucket = b.Bucket(capacity, 60_000)
    state = b.full(bucket, 0)
    ok, after, _ = b.take(bucket, state, 0, reserved)
    assert ok  # a full bucket admits any reservation (capped at capacity)
    cost = b.cost_in(bucket, reserved)
    settled = b.adjust(bucket, after, 0, cost - actual)
    assert settled.level == min(capacity, capacity - actual)


# --- the scripts against the model -------------------------------------------------------------------

def _run(coro):
    return asyncio.run(coro)


ops = st.lists(st.tuples(st.sampled_from(["reserve", "settle"]), st.integers(0, 30_000),
                         st.integers(0, 3_000)), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None)
@given(st.integers(100, 5_000), ops)
def test_lua_buckets_follow_the_python_model_exactly(valkey_url, capacity, sequence):
    async def scenario() -> None:
        redis = aioredis.from_url(valkey_url)
        now = {"ms": 1_000_000}
        limiter = Limiter(redis, clock=lambda: now["ms"])
        org, env, key = (uuid.uuid4().hex for _ in range(3))
        limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=capacity))
        bucket = b.Bucket(capacity, 60_000)
        model = b.full(bucket, now["ms"])
        open_reservations: list[tuple[str, int]] = []
        try:
            for op, gap, amount in sequence:
                now["ms"] += gap
                if op == "reserve":
                    rid = uuid.uuid4().hex
                    decision = await limiter.reserve(org, env, key, rid, amount, limits)
                    ok, model, retry = b.take(bucket, model, now["ms"], amount)
                    assert decision.admitted == ok and decision.retry_after_ms == retry
                    if ok:
                        open_reservations.append((rid, b.cost_in(bucket, amount)))
                elif open_reservations:
                    rid, cost = open_reservations.pop(0)
                    assert await limiter.settle(org, env, key, rid, amount)
                    assert not await limiter.settle(org, env, key, rid, amount)  # exactly once
                    model = b.adjust(bucket, model, now["ms"], cost - amount)
                stored = await redis.hget(request_keys(org, env, key, "x")[7], "m")  # key layer, tokens/min
                if stored is not None:
                    assert float(stored) == model.level
        finally:
            await redis.aclose()

    _run(scenario())


@pytest.mark.parametrize(("limits", "used", "hit"), [
    # Quotas in Quotas.limits() order: org/day, org/hour, env/day, env/hour; None = no quota.
    ((None, None, None, None), [10**9] * 4, None),  # nothing is limited
    ((100, None, None, None), [99, 0, 0, 0], None),  # one token below
    ((100, None, None, None), [100, 0, 0, 0], ("org", "d")),  # reached exactly: used up
    ((100, 50, None, None), [10, 50, 0, 0], ("org", "h")),
    ((None, None, 0, None), [0, 0, 0, 0], ("env", "d")),  # a zero quota allows nothing
    ((None, None, 500, 20), [0, 0, 499, 21], ("env", "h")),
    ((100, 50, 500, 20), [100, 50, 500, 20], ("org", "d")),  # several used up: the first in order
    ((None, 50, 500, None), [10**9, 49, 500, 10**9], ("env", "d")),  # counters without a quota never count
])
def test_a_quota_is_exceeded_exactly_when_a_counter_reached_it(limits, used, hit):
    assert exceeded(Quotas(*limits), used) == hit
