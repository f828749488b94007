"""Admission across scopes on a real Valkey: platform layers shed serverless traffic, reserved lanes bypass them."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from crosslogic.ratelimit import admission
from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits
from crosslogic.ratelimit.protocol import refusal


class Clock:
    """A fixed clock, a day later for each test: the platform's global bucket is shared by all of them."""

    start = 9_000_000

    def __init__(self) -> None:
        Clock.start += 86_400_000
        self.ms = Clock.start

    def __call__(self) -> int:
        return self.ms


@pytest.fixture(params=[False, True], ids=["one-call", "split-scopes"])
async def limiter(valkey_url, request):
    client = aioredis.from_url(valkey_url)
    yield Limiter(client, clock=Clock(), split_scopes=request.param)
    await client.aclose()


def _ids() -> tuple[str, str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())


SERVERLESS = TenantLimits(LayerLimits(tokens_per_min=100_000), LayerLimits(), LayerLimits(requests_per_min=50))
RESERVED = TenantLimits(LayerLimits(tokens_per_min=100_000), LayerLimits(), LayerLimits(),
                        reserved_tokens_per_sec=100)


async def test_saturated_region_sheds_serverless_with_server_busy_and_rolls_the_tenant_back(limiter):
    region = "r-" + uuid.uuid4().hex[:6]
    platform = PlatformLimits(regions={region: LayerLimits(tokens_per_min=1_000)})
    org, env, key = _ids()
    assert (await admission.admit(limiter, org, env, key, region, "a", 900, SERVERLESS, platform)).admitted
    shed = await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 500, SERVERLESS, platform)
    assert not shed.admitted and shed.layer == "region"
    assert refusal(shed).code == "server_busy" and refusal(shed).status == 429
    # The refused request consumed nothing of the tenant: tokens, and its request slot.
    assert await admission.settle(limiter, org, env, key, region, "a", 900)
    assert await limiter.charged(org, "org", org) == 900
    after = await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 1, SERVERLESS, PlatformLimits())
    assert after.tightest("requests_per_min").level == 48  # 50 - the two admitted; the shed one came back


async def test_reserved_lane_bypasses_a_saturated_platform_up_to_its_capacity(limiter):
    region = "r-" + uuid.uuid4().hex[:6]
    platform = PlatformLimits(global_=LayerLimits(tokens_per_min=1_000))
    flood = _ids()
    assert (await admission.admit(limiter, *flood, region, uuid.uuid4().hex, 1_000, SERVERLESS, platform)).admitted
    assert not (await admission.admit(limiter, *flood, region, uuid.uuid4().hex, 10, SERVERLESS, platform)).admitted
    org, env, key = _ids()
    for _ in range(6):  # 6 x 1,000 = the lane's minute of 100 tokens/s
        assert (await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 1_000, RESERVED,
                                      platform)).admitted
    # Above its reserved capacity the org falls back to serverless limits: the saturated platform.
    above = await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 1_000, RESERVED, platform)
    assert not above.admitted and above.layer == "global"


async def test_settlement_reaches_every_scope_the_request_was_reserved_in(limiter):
    region = "r-" + uuid.uuid4().hex[:6]
    platform = PlatformLimits(regions={region: LayerLimits(tokens_per_min=1_000)})
    org, env, key = _ids()
    request = uuid.uuid4().hex
    assert (await admission.admit(limiter, org, env, key, region, request, 900, SERVERLESS, platform)).admitted
    assert await admission.settle(limiter, org, env, key, region, request, 100)
    assert not await admission.settle(limiter, org, env, key, region, request, 100)
    # The region got its 800 unused tokens back too.
    assert (await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 900, SERVERLESS,
                                  platform)).admitted


# --- one call per request (one Valkey) == one call per scope (Redis Cluster) ---------------------------

admissions = st.lists(st.tuples(st.sampled_from(["admit", "settle"]), st.integers(0, 20_000),
                                st.integers(0, 1_500)), min_size=1, max_size=20)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.booleans(), admissions)
def test_one_call_and_scope_by_scope_admission_decide_alike(valkey_url, reserved_per_sec, lane, sequence):
    async def scenario() -> None:
        client = aioredis.from_url(valkey_url)
        clock = Clock()
        limiters = [Limiter(client, clock=clock), Limiter(client, clock=clock, split_scopes=True)]
        tenants = [(*_ids(), "r-" + uuid.uuid4().hex[:8]) for _ in limiters]
        tenant = TenantLimits(LayerLimits(tokens_per_min=5_000), LayerLimits(requests_per_min=12),
                              LayerLimits(tokens_per_sec=400, concurrency=4),
                              reserved_tokens_per_sec=reserved_per_sec if lane else 0)
        open_requests: list[list[str]] = [[], []]
        try:
            for op, gap, amount in sequence:
                clock.ms += gap
                answers = []
                for i, (limiter, (org, env, key, region)) in enumerate(zip(limiters, tenants, strict=True)):
                    platform = PlatformLimits(regions={region: LayerLimits(tokens_per_min=1_000)})
                    if op == "admit":
                        request = uuid.uuid4().hex
                        d = await admission.admit(limiter, org, env, key, region, request, amount, tenant, platform)
                        if d.admitted:
                            open_requests[i].append(request)
                        # Levels after an admission (after a refusal, split scopes report them before rollback).
                        levels = [v.level for v in d.buckets] if d.admitted else []
                        answers.append((d.admitted, d.layer, d.kind, d.retry_after_ms, tuple(levels),
                                        d.release_early))
                    elif open_requests[i]:
                        request = open_requests[i].pop(0)
                        answers.append(await admission.settle(limiter, org, env, key, region, request, amount))
                assert len(set(answers)) <= 1, answers
            charged = [await limiter.charged(org, "env", env)
                       for limiter, (org, env, _, _) in zip(limiters, tenants, strict=True)]
            assert charged[0] == charged[1]
        finally:
            await client.aclose()

    asyncio.run(scenario())


async def test_releasing_leases_reaches_every_scope_and_keeps_tokens_for_settlement(limiter):
    region = "r-" + uuid.uuid4().hex[:6]
    platform = PlatformLimits(regions={region: LayerLimits(concurrency=1, tokens_per_min=1_000)})
    tenant = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(concurrency=1))
    org, env, key = _ids()
    request = uuid.uuid4().hex
    held = await admission.admit(limiter, org, env, key, region, request, 900, tenant, platform)
    assert held.admitted and held.leases == 2  # the key's and the region's
    assert not (await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 1, tenant,
                                      platform)).admitted
    assert await admission.release_leases(limiter, org, env, key, region, request) == 2
    assert await admission.release_leases(limiter, org, env, key, region, request) == 0
    # Both slots are free; the region's 900 tokens are still reserved until settlement.
    tokens_left = await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 200, tenant, platform)
    assert not tokens_left.admitted and (tokens_left.layer, tokens_left.kind) == ("region", "tokens_per_min")
    assert await admission.settle(limiter, org, env, key, region, request, 100)
    assert (await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 800, tenant,
                                  platform)).admitted


# --- concurrency leases: freed early only where a set is at least half full -----------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.booleans(), st.lists(st.booleans(), min_size=1, max_size=40))
def test_leases_left_to_settlement_never_refuse_a_client_under_half_its_limit(valkey_url, limit, split, ops):
    """True starts a request, False ends the oldest in flight. An ended request frees its lease only if admission
    asked for the early release; the others linger (no settlement comes here). The limit still holds exactly, and
    a client with fewer than half its limit in flight is never refused."""
    async def scenario() -> None:
        client = aioredis.from_url(valkey_url)
        limiter = Limiter(client, clock=Clock(), split_scopes=split)
        org, env, key = _ids()
        region = "r-" + uuid.uuid4().hex[:8]
        tenant = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(concurrency=limit))
        in_flight: list[tuple[str, bool]] = []
        try:
            for start in ops:
                if not start:
                    if in_flight:
                        request, early = in_flight.pop(0)
                        if early:
                            await admission.release_leases(limiter, org, env, key, region, request)
                    continue
                request = uuid.uuid4().hex
                d = await admission.admit(limiter, org, env, key, region, request, 1, tenant, PlatformLimits())
                if len(in_flight) >= limit:
                    assert not d.admitted and d.kind == "concurrency"
                if 2 * len(in_flight) < limit:
                    assert d.admitted, (limit, len(in_flight))
                if d.admitted:
                    assert d.leases == 1
                    in_flight.append((request, d.release_early))
        finally:
            await client.aclose()

    asyncio.run(scenario())


async def test_a_full_set_is_waited_on_and_admits_once_settlement_frees_a_slot(valkey_url):
    client = aioredis.from_url(valkey_url)
    waiting = Limiter(client, concurrency_wait_ms=2_000)
    org, env, key = _ids()
    region = "r-" + uuid.uuid4().hex[:8]
    tenant = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(concurrency=1))
    try:
        ended = uuid.uuid4().hex
        first = await admission.admit(waiting, org, env, key, region, ended, 1, tenant, PlatformLimits())
        assert first.admitted and first.release_early  # one slot: always freed as the response ends

        async def settle_soon() -> None:
            await asyncio.sleep(0.05)
            assert await admission.settle(waiting, org, env, key, region, ended, 1)

        settling = asyncio.create_task(settle_soon())
        second = await admission.admit(waiting, org, env, key, region, uuid.uuid4().hex, 1, tenant, PlatformLimits())
        await settling
        assert second.admitted  # it waited for the slot rather than being refused
        # Nothing frees the slot now: refused once the wait is over (a limiter that does not wait: at once).
        impatient = Limiter(client)
        refused = await admission.admit(impatient, org, env, key, region, uuid.uuid4().hex, 1, tenant,
                                        PlatformLimits())
        assert not refused.admitted and refused.kind == "concurrency"
    finally:
        await client.aclose()
