"""The limiter engine on a real Valkey, with a controlled clock: layers, leases, shadow mode, scripts. Every test
runs on both client paths of the per-request scripts: redis-py (ScriptBatcher) and the lean client (resp.py)."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from crosslogic.ratelimit.engine import SETTLED, Limiter, tenant_scope
from crosslogic.ratelimit.limits import LayerLimits, TenantLimits
from crosslogic.ratelimit.resp import ScriptClient


class Clock:
    def __init__(self) -> None:
        self.ms = 5_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def redis(valkey_url):
    client = aioredis.from_url(valkey_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["redis-py", "resp"], autouse=True)
async def script_path(request, valkey_url, monkeypatch):
    """On "resp", every Limiter of the test sends reserve and release through one lean ScriptClient."""
    if request.param == "redis-py":
        yield
        return
    client = ScriptClient(valkey_url)
    original = Limiter.__init__

    def with_lean_scripts(self, redis, *args, scripts=None, **kwargs):
        original(self, redis, *args, scripts=scripts or client, **kwargs)

    monkeypatch.setattr(Limiter, "__init__", with_lean_scripts)
    yield
    await client.aclose()


def ids() -> tuple[str, str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())


def rid() -> str:
    return uuid.uuid4().hex


async def test_each_layer_trips_on_its_own_limit_and_names_itself(redis):
    clock = Clock()
    limiter = Limiter(redis, clock=clock)
    for layer in ("org", "env", "key"):
        org, env, key = ids()
        tight = LayerLimits(tokens_per_min=100)
        limits = TenantLimits(**{name: tight if name == layer else LayerLimits(tokens_per_min=10_000)
                                 for name in ("org", "env", "key")})
        assert (await limiter.reserve(org, env, key, rid(), 80, limits)).admitted
        refused = await limiter.reserve(org, env, key, rid(), 30, limits)
        assert not refused.admitted
        assert (refused.layer, refused.kind) == (layer, "tokens_per_min")
        # 10 tokens missing at 100 tokens/min: 6 s.
        assert refused.retry_after_ms == 6_000


async def test_refused_request_consumes_nothing_in_any_layer(redis):
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(tokens_per_min=1_000), LayerLimits(tokens_per_min=1_000),
                          LayerLimits(requests_per_min=1))
    first = rid()
    assert (await limiter.reserve(org, env, key, first, 10, limits)).admitted
    refused = await limiter.reserve(org, env, key, rid(), 10, limits)
    assert (refused.admitted, refused.layer, refused.kind) == (False, "key", "requests_per_min")
    assert refused.tightest("tokens_per_min").level == 990
    assert await limiter.settle(org, env, key, first, 10)
    assert await limiter.charged(org, "org", org) == 10


async def test_a_key_at_its_limit_does_not_affect_another_key_of_the_same_env(redis):
    limiter = Limiter(redis, clock=Clock())
    org, env, key_a = ids()
    key_b = str(uuid.uuid4())
    limits = TenantLimits(LayerLimits(tokens_per_min=10_000), LayerLimits(tokens_per_min=10_000),
                          LayerLimits(tokens_per_min=100))
    assert (await limiter.reserve(org, env, key_a, rid(), 100, limits)).admitted
    assert not (await limiter.reserve(org, env, key_a, rid(), 1, limits)).admitted
    assert (await limiter.reserve(org, env, key_b, rid(), 100, limits)).admitted


async def test_settlement_refunds_unused_tokens_exactly_once(redis):
    clock = Clock()
    limiter = Limiter(redis, clock=clock)
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    request = rid()
    assert (await limiter.reserve(org, env, key, request, 900, limits)).admitted
    assert not (await limiter.reserve(org, env, key, rid(), 200, limits)).admitted
    assert await limiter.settle(org, env, key, request, 150)
    assert not await limiter.settle(org, env, key, request, 150)  # a replayed log entry changes nothing
    assert await limiter.charged(org, "key", key) == 150
    assert (await limiter.reserve(org, env, key, rid(), 800, limits)).admitted


async def test_settlement_debits_usage_beyond_the_reservation(redis):
    clock = Clock()
    limiter = Limiter(redis, clock=clock)
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=600))
    request = rid()
    assert (await limiter.reserve(org, env, key, request, 100, limits)).admitted
    assert await limiter.settle(org, env, key, request, 700)  # the prompt estimate was far too low
    assert await limiter.charged(org, "key", key) == 700
    refused = await limiter.reserve(org, env, key, rid(), 1, limits)
    # 100 tokens of debt + 1 at 10 tokens/s: the key waits 10.1 s.
    assert not refused.admitted and refused.retry_after_ms == 10_100


async def test_repeated_reservation_of_one_request_id_charges_once(redis):
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    request = rid()
    assert (await limiter.reserve(org, env, key, request, 300, limits)).admitted
    again = await limiter.reserve(org, env, key, request, 300, limits)
    assert again.admitted and again.repeated
    assert (await limiter.reserve(org, env, key, rid(), 700, limits)).admitted  # 300 held once, not twice
    assert await limiter.settle(org, env, key, request, 300)
    assert await limiter.charged(org, "key", key) == 300


async def test_concurrency_leases_are_released_at_settlement_and_expire_on_their_own(redis):
    clock = Clock()
    limiter = Limiter(redis, clock=clock, reservation_ttl_ms=30_000)
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(concurrency=2), LayerLimits())
    first, second = rid(), rid()
    assert (await limiter.reserve(org, env, key, first, 1, limits)).admitted
    assert (await limiter.reserve(org, env, key, second, 1, limits)).admitted
    refused = await limiter.reserve(org, env, key, rid(), 1, limits)
    assert (refused.admitted, refused.layer, refused.kind) == (False, "env", "concurrency")
    assert await limiter.settle(org, env, key, first, 1)
    assert (await limiter.reserve(org, env, key, rid(), 1, limits)).admitted
    # Two leases held, never settled (lost log entries): the lease TTL frees them.
    assert not (await limiter.reserve(org, env, key, rid(), 1, limits)).admitted
    clock.ms += 30_001
    assert (await limiter.reserve(org, env, key, rid(), 1, limits)).admitted


async def test_a_lease_can_expire_before_its_reservation(redis):
    clock = Clock()
    limiter = Limiter(redis, clock=clock, reservation_ttl_ms=60_000, lease_ttl_ms=20_000)
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(concurrency=1, tokens_per_min=1_000))
    lost = rid()
    assert (await limiter.reserve(org, env, key, lost, 600, limits)).admitted
    clock.ms += 20_001
    # The lease of the never-settled request is free again; its 600 tokens are still reserved (refill aside).
    assert (await limiter.reserve(org, env, key, rid(), 100, limits)).admitted
    assert await limiter.settle(org, env, key, lost, 600)  # settling late still works, exactly once


async def test_a_reservation_arriving_after_its_settlement_holds_nothing(redis):
    # Envoy gave up waiting for the rate-limit service, answered and logged the request (settled: nothing
    # was reserved yet), then the service's reservation ran late. It must not hold tokens or a lease.
    limiter = Limiter(redis, clock=Clock(), reservation_ttl_ms=30_000)
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(concurrency=1, tokens_per_min=100), LayerLimits())
    late = rid()
    assert not await limiter.settle(org, env, key, late, 0)
    assert (await limiter.reserve(org, env, key, late, 100, limits)).repeated
    assert (await limiter.reserve(org, env, key, rid(), 100, limits)).admitted  # lease and tokens still free
    assert not await limiter.settle(org, env, key, late, 0)


async def test_shadow_layer_reports_but_never_refuses(redis):
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(tokens_per_min=100, shadow=True), LayerLimits(), LayerLimits())
    assert (await limiter.reserve(org, env, key, rid(), 100, limits)).admitted
    over = await limiter.reserve(org, env, key, rid(), 50, limits)
    assert over.admitted and (over.shadow_layer, over.shadow_kind) == ("org", "tokens_per_min")


async def test_one_limit_in_shadow_mode_while_the_others_of_its_layer_refuse(redis):
    # Rolling out a new tokens/min rule for a key whose requests/min limit is already enforced.
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    rule = LayerLimits(tokens_per_min=100, requests_per_min=3, shadow_kinds=frozenset({"tokens_per_min"}))
    limits = TenantLimits(LayerLimits(), LayerLimits(), rule)
    assert (await limiter.reserve(org, env, key, rid(), 100, limits)).admitted
    over = await limiter.reserve(org, env, key, rid(), 100, limits)
    assert over.admitted and (over.shadow_layer, over.shadow_kind) == ("key", "tokens_per_min")
    assert (await limiter.reserve(org, env, key, rid(), 1, limits)).admitted
    refused = await limiter.reserve(org, env, key, rid(), 1, limits)
    assert (refused.admitted, refused.layer, refused.kind) == (False, "key", "requests_per_min")
    assert limits.fail_open() and rule.enforced


async def test_settling_with_other_scopes_than_reserved_is_refused_and_changes_nothing(redis):
    from redis.exceptions import ResponseError

    from crosslogic.ratelimit import admission
    from crosslogic.ratelimit.limits import PlatformLimits

    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    region = "r-" + uuid.uuid4().hex[:6]
    platform = PlatformLimits(regions={region: LayerLimits(tokens_per_min=1_000)})
    request = rid()
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    assert (await admission.admit(limiter, org, env, key, region, request, 500, limits, platform)).admitted
    with pytest.raises(ResponseError, match="do not match"):
        await limiter.settle(org, env, key, request, 10)  # tenant scope only: the region's keys are missing
    assert await admission.settle(limiter, org, env, key, region, request, 10)  # still unsettled


async def test_scripts_are_reloaded_after_redis_forgets_them(redis):
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    before, after = rid(), rid()
    assert (await limiter.reserve(org, env, key, before, 1, limits)).admitted
    await redis.script_flush()  # what a Redis restart does to the script cache
    assert (await limiter.reserve(org, env, key, after, 1, limits)).admitted
    await redis.script_flush()
    assert await limiter.settle_many([([tenant_scope(org, env, key)], r, 1) for r in (before, after)]) == [SETTLED] * 2
    assert await limiter.charged(org, "key", key) == 2


async def test_org_keys_share_one_cluster_hash_slot(redis):
    from redis.crc import key_slot

    from crosslogic.ratelimit.engine import request_keys

    org, env, key = ids()
    slots = {key_slot(k.encode()) for k in request_keys(org, env, key, rid())}
    assert len(slots) == 1


async def test_tokens_per_second_bucket_smooths_bursts_within_a_minute_limit(redis):
    clock = Clock()
    limiter = Limiter(redis, clock=clock)
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_sec=100, tokens_per_min=6_000))
    assert (await limiter.reserve(org, env, key, rid(), 100, limits)).admitted
    burst = await limiter.reserve(org, env, key, rid(), 50, limits)
    assert (burst.admitted, burst.layer, burst.kind, burst.retry_after_ms) == (False, "key", "tokens_per_sec", 500)
    clock.ms += 500
    assert (await limiter.reserve(org, env, key, rid(), 50, limits)).admitted


async def test_limits_of_any_size_settle(redis):
    # Capacities travel in the reservation record as the caller's digits, so 10^15 does not become "1e+15".
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    huge = LayerLimits(tokens_per_day=10**15, tokens_per_min=2 * 10**15)
    limits = TenantLimits(huge, LayerLimits(), LayerLimits())
    request = rid()
    assert (await limiter.reserve(org, env, key, request, 10**15, limits)).admitted
    assert await limiter.settle(org, env, key, request, 7)
    assert (await limiter.reserve(org, env, key, rid(), 10**15 - 7, limits)).admitted  # the refund came back


async def test_releasing_a_lease_frees_the_slot_at_once_and_leaves_the_tokens_to_settlement(redis):
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(concurrency=3), LayerLimits(), LayerLimits(concurrency=1, tokens_per_min=1_000))
    first = rid()
    taken = await limiter.reserve(org, env, key, first, 600, limits)
    assert taken.admitted and taken.leases == 2  # org and key
    assert not (await limiter.reserve(org, env, key, rid(), 1, limits)).admitted  # key: one at a time
    scopes = [tenant_scope(org, env, key)]
    assert await limiter.release_leases(scopes, first) == 2
    assert await limiter.release_leases(scopes, first) == 0  # idempotent
    # The slot is free, the 600 tokens are still held until settlement.
    refused = await limiter.reserve(org, env, key, rid(), 500, limits)
    assert (refused.admitted, refused.kind) == (False, "tokens_per_min")
    second = rid()
    assert (await limiter.reserve(org, env, key, second, 300, limits)).admitted
    assert await limiter.settle(org, env, key, first, 100)  # refunds 500, exactly once
    assert await limiter.charged(org, "key", key) == 100
    assert await limiter.release_leases(scopes, first) == 0  # after settlement: nothing
    # The second request still holds its lease: releasing the first never touched it.
    assert not (await limiter.reserve(org, env, key, rid(), 1, limits)).admitted


async def test_a_request_without_a_concurrency_limit_takes_no_lease(redis):
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    decision = await limiter.reserve(org, env, key, rid(), 10, TenantLimits(LayerLimits(tokens_per_min=100),
                                                                           LayerLimits(), LayerLimits()))
    assert decision.admitted and decision.leases == 0
    refused = await limiter.reserve(org, env, key, rid(), 1_000, TenantLimits(
        LayerLimits(tokens_per_min=100, concurrency=5), LayerLimits(), LayerLimits()))
    assert not refused.admitted and refused.leases == 0


async def test_a_repeated_check_asks_for_the_early_release_while_the_reservation_holds_leases(redis):
    """Envoy retries a check whose answer was lost: the retried answer is the one acted on, so it must still name
    the lease for the release; after settlement the tombstone holds none."""
    limiter = Limiter(redis, clock=Clock())
    org, env, key = ids()
    limits = TenantLimits(LayerLimits(concurrency=256), LayerLimits(), LayerLimits(concurrency=1))
    request = rid()
    first = await limiter.reserve(org, env, key, request, 10, limits)
    assert first.admitted and first.leases == 2 and first.release_early  # the key's set (limit 1) is full
    again = await limiter.reserve(org, env, key, request, 10, limits)
    assert again.repeated and again.release_early
    assert await limiter.settle(org, env, key, request, 10)
    assert not (await limiter.reserve(org, env, key, request, 10, limits)).release_early
    far = rid()  # a lease far from its limit is left to settlement, repeated or not
    wide = TenantLimits(LayerLimits(concurrency=256), LayerLimits(), LayerLimits())
    assert not (await limiter.reserve(org, env, key, far, 10, wide)).release_early
    repeated = await limiter.reserve(org, env, key, far, 10, wide)
    assert repeated.repeated and repeated.release_early  # still holds a lease: released (only a call too many)
