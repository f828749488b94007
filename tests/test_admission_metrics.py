"""Admission metrics: the gate on real Valkey and Postgres counts outcomes by refusing layer and kind, shadow
would-refuse, degraded decisions and limiter latency; ext_authz serves them on /metrics in the real stack."""

from __future__ import annotations

import urllib.request
import uuid

import asyncpg
import openai
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.gate import AdmissionGate, LimiterUnavailable
from crosslogic.ratelimit.store import LimitStore
from crosslogic.runtime.processes import free_port
from crosslogic.store import tenancy
from crosslogic.store.db import open_pool
from tests.gateway_helpers import client
from tests.ratelimit_helpers import limited_tenant, wait_for


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _tenant(database_url: str, *updates: str) -> tuple[str, str, str]:
    """An org/env/key limited to 1 request per minute on the key; `updates` run afterwards ($1 = key id)."""
    conn = await asyncpg.connect(database_url)
    try:
        org = await tenancy.create_org(conn, "acme")
        env = await tenancy.create_env(conn, org.org_id, "prod")
        key, _ = await tenancy.create_key(conn, b"secret", org.org_id, env.env_id)
        await conn.execute("UPDATE api_keys SET rate_limit_requests_per_min = 1 WHERE key_id = $1",
                           uuid.UUID(key.key_id))
        for sql in updates:
            await conn.execute(sql, *([uuid.UUID(key.key_id)] if "$1" in sql else []))
        return str(org.org_id), str(env.env_id), str(key.key_id)
    finally:
        await conn.close()


@pytest.fixture
async def redis_client(valkey_url):
    redis = aioredis.from_url(valkey_url)
    yield redis
    await redis.aclose()


async def test_admitted_and_refused_decisions_are_counted_by_layer_and_kind_and_timed(database_url, redis_client):
    org, env, key = await _tenant(database_url)
    admitted = sample("crosslogic_ratelimit_decisions_total", outcome="admitted", layer="", kind="")
    refused = sample("crosslogic_ratelimit_decisions_total", outcome="refused", layer="key", kind="requests_per_min")
    timed = sample("crosslogic_ratelimit_limiter_duration_seconds_count")
    async with open_pool(database_url) as pool:
        gate = AdmissionGate(Limiter(redis_client), LimitStore(pool))
        assert (await gate.decide(org, env, key, "ap-south", uuid.uuid4().hex, 10)).admitted
        assert not (await gate.decide(org, env, key, "ap-south", uuid.uuid4().hex, 10)).admitted
    assert sample("crosslogic_ratelimit_decisions_total", outcome="admitted", layer="", kind="") == admitted + 1
    assert sample("crosslogic_ratelimit_decisions_total", outcome="refused", layer="key",
                  kind="requests_per_min") == refused + 1
    assert sample("crosslogic_ratelimit_limiter_duration_seconds_count") == timed + 2


async def test_shadow_limit_that_would_refuse_is_counted_and_admitted(database_url, redis_client):
    org, env, key = await _tenant(database_url, "UPDATE api_keys SET rate_limit_shadow = true WHERE key_id = $1")
    before = sample("crosslogic_ratelimit_shadow_refusals_total", layer="key", kind="requests_per_min")
    async with open_pool(database_url) as pool:
        gate = AdmissionGate(Limiter(redis_client), LimitStore(pool))
        for _ in range(2):
            assert (await gate.decide(org, env, key, "ap-south", uuid.uuid4().hex, 10)).admitted
    assert sample("crosslogic_ratelimit_shadow_refusals_total", layer="key", kind="requests_per_min") == before + 1


@pytest.mark.parametrize(("fail_open", "outcome"), [(True, "admitted"), (False, "refused")])
async def test_decisions_without_redis_are_counted_as_degraded(database_url, fail_open, outcome):
    org, env, key = await _tenant(
        database_url, f"UPDATE rate_limit_layers SET fail_open = {str(fail_open).lower()} WHERE layer = 'key'")
    nothing_listens = aioredis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
    before = sample("crosslogic_ratelimit_degraded_decisions_total", outcome=outcome, reason="redis_unavailable")
    timed = sample("crosslogic_ratelimit_limiter_duration_seconds_count")
    async with open_pool(database_url) as pool:
        gate = AdmissionGate(Limiter(nothing_listens), LimitStore(pool))
        if fail_open:
            assert (await gate.decide(org, env, key, "ap-south", uuid.uuid4().hex, 10)).degraded
        else:
            with pytest.raises(LimiterUnavailable):
                await gate.decide(org, env, key, "ap-south", uuid.uuid4().hex, 10)
    await nothing_listens.aclose()
    assert sample("crosslogic_ratelimit_degraded_decisions_total", outcome=outcome,
                  reason="redis_unavailable") == before + 1
    assert sample("crosslogic_ratelimit_limiter_duration_seconds_count") == timed + 1


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _refusals(text: str) -> float:
    line = 'crosslogic_ratelimit_decisions_total{kind="requests_per_min",layer="key",outcome="refused"}'
    return sum(float(row.rsplit(" ", 1)[1]) for row in text.splitlines() if row.startswith(line))


async def _refusal_scraped(port: int, before: float) -> str:
    async def counted():
        text = _scrape(port)
        return text if _refusals(text) >= before + 1 else None

    return await wait_for(counted, f"the refusal on :{port}/metrics")


async def test_ext_authz_serves_admission_metrics_without_tenant_ids(gateway):
    await _deciding_process_serves_admission_metrics_without_tenant_ids(gateway, "authz_metrics")


async def test_the_rate_limit_service_serves_admission_metrics_without_tenant_ids(rls_gateway):
    await _deciding_process_serves_admission_metrics_without_tenant_ids(rls_gateway, "ratelimit_metrics")


async def _deciding_process_serves_admission_metrics_without_tenant_ids(stack: dict, metrics_port: str) -> None:
    """Admission in ext_authz (default) or in `serve ratelimit` (admission "rls"): the deciding process counts."""
    tenant = await limited_tenant(stack, key=(None, 1, None))
    port = stack["ports"][metrics_port]
    before = _refusals(_scrape(port))
    api = client(stack, tenant["keys"][0]["api_key"])
    await api.chat.completions.create(model="llama-3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.RateLimitError, match="requests per minute"):
        await api.chat.completions.create(model="llama-3-8b", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2)
    text = await _refusal_scraped(port, before)
    assert "crosslogic_ratelimit_limiter_duration_seconds_bucket" in text
    for ident in (tenant["org_id"], tenant["env_id"], tenant["keys"][0]["key_id"]):
        assert ident not in text
