"""Admission across scopes on a real Valkey: platform layers shed serverless traffic, reserved lanes bypass them."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from crosslogic.ratelimit import admission
from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits
from crosslogic.ratelimit.protocol import refusal


class Clock:
    ms = 9_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def limiter(valkey_url):
    client = aioredis.from_url(valkey_url)
    yield Limiter(client, clock=Clock())
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
