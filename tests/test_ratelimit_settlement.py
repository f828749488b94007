"""Settlement and admission batching on a real Valkey: exactly once, quotas for every request, exactness
when concurrent admissions share a pipeline."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from crosslogic.accounting.usage import UsageRecord
from crosslogic.ratelimit import admission
from crosslogic.ratelimit.engine import ALREADY_SETTLED, SETTLED, UNRESERVED, Limiter, tenant_scope
from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits
from crosslogic.ratelimit.quota import count_usage_commands, quota_keys
from crosslogic.ratelimit.resp import ScriptClient
from crosslogic.ratelimit.settlement import BatchProgress, Settler


@pytest.fixture
async def redis(valkey_url):
    client = aioredis.from_url(valkey_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["redis-py", "lean"])
async def settling_limiter(request, redis, valkey_url):
    """A limiter whose batched settlement goes through redis-py or the lean pipelined client (the accounting
    service's); both must settle alike."""
    if request.param == "redis-py":
        yield Limiter(redis)
        return
    scripts = ScriptClient(valkey_url, timeout=2.0)
    yield Limiter(redis, scripts=scripts)
    await scripts.aclose()


def _record(org: str, env: str, key: str, request_id: str, tokens: int) -> UsageRecord:
    return UsageRecord(request_id=request_id, occurred_at=datetime.now(UTC), org_id=org, env_id=env, key_id=key,
                       region="ap-south", model="llama-3-8b", endpoint="chat.completions", streamed=False,
                       status_code=200, prompt_tokens=tokens - 1, completion_tokens=1, usage_source="reported",
                       latency_ms=5, node=None)


async def test_settle_tells_a_settlement_from_a_request_never_reserved_and_from_a_replay(settling_limiter):
    limiter = settling_limiter
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    reserved, unreserved = uuid.uuid4().hex, uuid.uuid4().hex
    assert (await limiter.reserve(org, env, key, reserved, 100, limits)).admitted
    scopes = [tenant_scope(org, env, key)]
    calls = [(scopes, reserved, 40), (scopes, unreserved, 40)]
    assert await limiter.settle_many(calls) == [SETTLED, UNRESERVED]
    assert await limiter.settle_many(calls) == [ALREADY_SETTLED, ALREADY_SETTLED]


async def test_requests_admitted_without_a_reservation_count_against_quotas_once(redis, settling_limiter):
    # e.g. admitted fail-open while Redis was down: nothing reserved, yet the tokens were spent.
    limiter = settling_limiter
    settler = Settler(limiter)
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    reserved = uuid.uuid4().hex
    assert (await admission.admit(limiter, org, env, key, "ap-south", reserved, 100, limits,
                                  PlatformLimits())).admitted
    records = [_record(org, env, key, reserved, 70), _record(org, env, key, uuid.uuid4().hex, 30)]
    assert await settler.settle_batch(records) == [True, False]
    assert await settler.settle_batch(records) == [False, False]  # the durable log replays both
    counters = [int(v or 0) for v in await redis.mget(quota_keys(org, env, records[0].occurred_at))]
    assert counters == [100, 100, 100, 100]  # org/env x day/hour: each request counted once
    assert await limiter.charged(org, "key", key) == 70  # the limiter only settles what it reserved


async def test_submit_and_wait_returns_once_the_quota_counters_hold_the_records(redis):
    # The site API answers a push only then: a site's sync begun after the answer must see its records counted.
    settler = Settler(Limiter(redis), batch_size=2)
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    settler.submit(_record(org, env, key, uuid.uuid4().hex, 5))  # queued before: settled in order, first
    records = [_record(org, env, key, uuid.uuid4().hex, tokens) for tokens in (10, 20, 30)]
    task = asyncio.create_task(settler.run())
    try:
        await asyncio.wait_for(settler.submit_and_wait(records), 30)
        counters = [int(v or 0) for v in await redis.mget(quota_keys(org, env, records[0].occurred_at))]
        assert counters == [65] * 4 and settler.settled == settler.queued == 4
        await asyncio.wait_for(settler.submit_and_wait(records), 30)  # a re-sent batch: counted once
        assert [int(v or 0) for v in await redis.mget(quota_keys(org, env, records[0].occurred_at))] == [65] * 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_split_scope_batch_retried_after_a_fault_settles_every_scope_and_counts_quotas_once(redis):
    limiter = Limiter(redis, split_scopes=True)
    settler = Settler(limiter)
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    platform = PlatformLimits(global_=LayerLimits(tokens_per_min=1_000_000))
    request_id = uuid.uuid4().hex
    assert (await admission.admit(limiter, org, env, key, "ap-south", request_id, 100, limits, platform)).admitted
    settle_many, calls = limiter.settle_many, []

    async def failing_once_after_the_first_step(settlements):
        calls.append(settlements)
        if len(calls) == 2:  # the tenant scope settled; Redis drops before the platform scopes are
            raise RedisConnectionError("connection lost")
        return await settle_many(settlements)

    limiter.settle_many = failing_once_after_the_first_step
    records = [_record(org, env, key, request_id, 70)]
    progress = BatchProgress()
    with pytest.raises(RedisConnectionError):
        await settler.settle_batch(records, progress)
    assert await settler.settle_batch(records, progress) == [True]  # the retry Settler.run makes
    limiter.settle_many = settle_many
    _, later = admission.settlement_calls(limiter, org, env, key, "ap-south")
    assert later and await limiter.settle_many([(scopes, request_id, 70) for scopes in later]) \
        == [ALREADY_SETTLED] * len(later)  # every platform scope settled by the retry
    counters = [int(v or 0) for v in await redis.mget(quota_keys(org, env, records[0].occurred_at))]
    assert counters == [70, 70, 70, 70]  # counted once


async def test_concurrent_admissions_batched_into_one_pipeline_stay_exact(redis):
    limiter = Limiter(redis)
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    limits = TenantLimits(LayerLimits(), LayerLimits(requests_per_min=37), LayerLimits(concurrency=50))
    round_trips: list[str] = []
    pipeline, evalsha = redis.pipeline, redis.evalsha

    def counting_pipeline(*args, **kwargs):
        round_trips.append("pipeline")
        return pipeline(*args, **kwargs)

    async def counting_evalsha(*args, **kwargs):
        round_trips.append("evalsha")
        return await evalsha(*args, **kwargs)

    redis.pipeline, redis.evalsha = counting_pipeline, counting_evalsha
    decisions = await asyncio.gather(*(limiter.reserve(org, env, key, uuid.uuid4().hex, 10, limits)
                                       for _ in range(100)))
    assert sum(d.admitted for d in decisions) == 37  # the request limit, exactly
    refused = [d for d in decisions if not d.admitted]
    assert {(d.layer, d.kind) for d in refused} == {("env", "requests_per_min")}
    assert len(round_trips) < 10, round_trips  # 100 concurrent calls, a few pipelines: not 100 round trips


async def test_a_batch_survives_redis_forgetting_the_script_and_a_cancelled_caller(redis):
    limiter = Limiter(redis)
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    assert (await limiter.reserve(org, env, key, uuid.uuid4().hex, 1, limits)).admitted
    await redis.script_flush()  # what a Redis restart does to the script cache
    calls = [asyncio.ensure_future(limiter.reserve(org, env, key, uuid.uuid4().hex, 1, limits)) for _ in range(20)]
    calls[3].cancel()  # Envoy gave up on one Check: the others still get their answers
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert all(d.admitted for i, d in enumerate(done) if i != 3)


async def test_after_a_valkey_restart_a_bucket_hands_back_at_most_a_minute_of_refill(tmp_path):
    # Bucket levels reach the AOF only when their TTL moves (buckets.lua): between two such writes at most
    # a minute of refill is consumed, so a restart may lose at most that much of a bucket's consumption.
    from crosslogic.runtime.valkey import EmbeddedValkey

    server = EmbeddedValkey(tmp_path / "valkey").start()
    now = {"ms": 7_000_000}
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    per_day = 1_440_000  # refills 1,000 tokens a minute
    limits = TenantLimits(LayerLimits(tokens_per_day=per_day), LayerLimits(), LayerLimits())
    redis = aioredis.from_url(server.url)
    limiter = Limiter(redis, clock=lambda: now["ms"])
    for _ in range(250):  # 10 tokens each: the moment "full again" moves 0.6 s per request
        assert (await limiter.reserve(org, env, key, uuid.uuid4().hex, 10, limits)).admitted
    before = (await limiter.reserve(org, env, key, uuid.uuid4().hex, 0, limits)).tightest("tokens_per_day").level
    await redis.aclose()
    server.stop()
    server = EmbeddedValkey(tmp_path / "valkey", port=server.port).start()
    redis = aioredis.from_url(server.url)
    try:
        limiter = Limiter(redis, clock=lambda: now["ms"])
        after = (await limiter.reserve(org, env, key, uuid.uuid4().hex, 0, limits)).tightest("tokens_per_day").level
        assert before == per_day - 2_500
        assert before <= after <= before + 1_000  # at most a minute of refill handed back
        assert after < per_day  # the bucket itself survived the restart
    finally:
        await redis.aclose()
        server.stop()


@given(st.lists(st.tuples(st.sampled_from(["o1", "o2"]), st.sampled_from(["e1", "e2"]), st.integers(-5, 1_000),
                          st.sampled_from([datetime(2026, 12, 1, 23, 59, tzinfo=UTC),
                                           datetime(2026, 12, 2, 0, 1, tzinfo=UTC)])), max_size=40))
def test_a_batch_s_quota_commands_add_what_each_request_would_once_per_counter(usages):
    expected: dict[str, int] = {}
    for org, env, tokens, at in usages:
        for key in quota_keys(org, env, at):
            if tokens > 0:
                expected[key] = expected.get(key, 0) + tokens
    commands = count_usage_commands(usages)
    assert {key: n for name, key, n in commands if name == "INCRBY"} == expected
    assert len(commands) == 2 * len(expected)  # one INCRBY and one EXPIRE per counter
    assert {key for name, key, _ in commands if name == "EXPIRE"} == set(expected)
