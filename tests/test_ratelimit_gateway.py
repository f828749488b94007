"""Limits through the real gateway: Envoy -> ext_authz (+ crosslogic.ratelimit's gate on Valkey) -> simulator
-> ledger; and the same admission through Envoy's ratelimit filter and `serve ratelimit` (admission "rls")."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from tests.gateway_helpers import client
from tests.ratelimit_helpers import (
    SET_REGION_LIMIT_SQL,
    SET_RESERVED_SQL,
    charged,
    execute,
    ledger_for_key,
    limited_tenant,
    quota_counted,
    wait_for,
)

MESSAGES = [{"role": "user", "content": "Count for me please"}]
LAYER_WORDS = {"org": "organization", "env": "environment", "key": "API key"}


async def _chat(gateway: dict, api_key: str, max_tokens: int):
    return await client(gateway, api_key).chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=max_tokens)


async def _raw_chat(gateway: dict, api_key: str, max_tokens: int) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http, http.post(
        f"{gateway['gateway_url']}/chat/completions", headers={"authorization": f"Bearer {api_key}"},
        json={"model": "llama-3-8b", "messages": MESSAGES, "max_tokens": max_tokens},
    ) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status, headers, await response.json(content_type=None)


@pytest.mark.parametrize("layer", ["org", "env", "key"])
async def test_each_layer_refuses_with_openai_429_naming_itself_and_retry_after(gateway, layer):
    tenant = await limited_tenant(gateway, **{layer: (200, None, None)})
    api_key = tenant["keys"][0]["api_key"]
    first = await _chat(gateway, api_key, 150)  # reserves ~155 of 200
    assert first.http_response.status_code == 200
    status, headers, body = await _raw_chat(gateway, api_key, 150)
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
    assert LAYER_WORDS[layer] in body["error"]["message"] and "tokens per minute" in body["error"]["message"]
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-tokens"] == "200"
    assert "application/json" in headers["content-type"]


async def test_openai_client_sees_rate_limit_error(gateway):
    tenant = await limited_tenant(gateway, key=(None, 1, None))
    api_key = tenant["keys"][0]["api_key"]
    await _chat(gateway, api_key, 5)
    with pytest.raises(openai.RateLimitError) as refused:
        await _chat(gateway, api_key, 5)
    assert refused.value.code == "rate_limit_exceeded" and "requests per minute" in refused.value.message


async def test_successful_responses_carry_openai_rate_limit_headers(gateway):
    tenant = await limited_tenant(gateway, key=(5_000, 100, None))
    raw = await _chat(gateway, tenant["keys"][0]["api_key"], 20)
    headers = raw.headers
    assert headers["x-ratelimit-limit-tokens"] == "5000" and headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-remaining-requests"] == "99"
    # A fresh key's full bucket minus this request's reservation: the prompt estimate (23 characters // 4 + 4 per
    # message + 5 per reply = 14, extauthz/estimate.py) plus max_tokens 20.
    assert headers["x-ratelimit-remaining-tokens"] == str(5_000 - (14 + 20))
    assert headers["x-ratelimit-reset-tokens"].endswith(("ms", "s"))
    assert headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
    streamed = await client(gateway, tenant["keys"][0]["api_key"]).chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=5, stream=True)
    assert streamed.headers["x-ratelimit-remaining-requests"] == "98"
    async for _ in streamed.parse():
        pass


async def test_key_at_its_limit_does_not_affect_another_key_of_the_same_env(gateway):
    tenant = await limited_tenant(gateway, keys=2, key=(200, None, None))
    first, second = (k["api_key"] for k in tenant["keys"])
    await _chat(gateway, first, 150)
    assert (await _raw_chat(gateway, first, 150))[0] == 429
    assert (await _chat(gateway, second, 150)).http_response.status_code == 200


async def test_settlement_refunds_the_unused_reservation(gateway):
    tenant = await limited_tenant(gateway, key=(1_000, None, None))
    key = tenant["keys"][0]
    # The reservation (prompt estimate + max_tokens) differs from the real usage (the node's prompt
    # count + completion): after settlement the key is charged exactly the real usage.
    raw = await _chat(gateway, key["api_key"], 30)
    usage = raw.parse().usage.total_tokens

    async def settled():
        return await charged(gateway, tenant["org_id"], "key", key["key_id"]) == usage

    await wait_for(settled, "settlement of the request")
    # A full reservation's worth is available again except what was really used.
    assert (await _chat(gateway, key["api_key"], 1_000 - usage - 20)).http_response.status_code == 200


async def test_request_refused_by_authz_charges_nothing(gateway):
    tenant = await limited_tenant(gateway, key=(1_000, None, None))
    key = tenant["keys"][0]
    status, _, body = await _raw_chat(gateway, key["api_key"], 10**6)  # over the model's max: 400 in authz
    assert status == 400
    assert await charged(gateway, tenant["org_id"], "key", key["key_id"]) == 0


async def test_fifty_concurrent_clients_never_overshoot_and_counters_match_the_ledger(gateway):
    limit = 10_000
    tenant = await limited_tenant(gateway, key=(limit, None, None))
    key = tenant["keys"][0]
    api = client(gateway, key["api_key"])
    rng = random.Random(7)
    outcomes = {"ok": 0, "limited": 0, "cut": 0}
    biggest_reservation = 0
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(i: int) -> None:
        nonlocal biggest_reservation
        max_tokens = rng.randint(20, 400)
        biggest_reservation = max(biggest_reservation, max_tokens + 50)
        mode = i % 3
        try:
            if mode == 0:
                await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=max_tokens)
                outcomes["ok"] += 1
            else:
                stream = await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES,
                                                           max_tokens=max_tokens, stream=True)
                async for _ in stream:
                    if mode == 2:  # disconnect mid-stream
                        outcomes["cut"] += 1
                        break
                else:
                    outcomes["ok"] += 1
                await stream.close()
        except openai.RateLimitError:
            outcomes["limited"] += 1

    async def client_loop(c: int) -> None:
        for r in range(4):
            await one(c * 4 + r)

    await asyncio.gather(*(client_loop(c) for c in range(50)))
    elapsed_ms = (loop.time() - started) * 1000
    sent = sum(outcomes.values())
    assert outcomes["limited"] > 0 and outcomes["ok"] > 0

    async def all_logged():
        count, tokens = await ledger_for_key(gateway, key["key_id"])
        return (count, tokens) if count == sent else None

    _, ledger_tokens = await wait_for(all_logged, "every request in the ledger")
    # Admitted tokens (what the nodes really served) stay within the bucket: its capacity, what it
    # refilled while the test ran, and at most one reservation's overshoot.
    assert ledger_tokens <= limit + elapsed_ms * limit / 60_000 + biggest_reservation

    async def counters_match():
        return await charged(gateway, tenant["org_id"], "key", key["key_id"]) == ledger_tokens

    await wait_for(counters_match, "counters equal to the ledger after settlement")
    assert await charged(gateway, tenant["org_id"], "env", tenant["env_id"]) == ledger_tokens
    assert await charged(gateway, tenant["org_id"], "org", tenant["org_id"]) == ledger_tokens


async def test_reserved_tenant_keeps_getting_200s_while_a_serverless_flood_is_shed(gateway):
    flood = (await limited_tenant(gateway))["keys"][0]["api_key"]
    reserved = await limited_tenant(gateway)
    await execute(gateway, SET_RESERVED_SQL, uuid.UUID(reserved["org_id"]), 200)  # 12,000 tokens/min lane
    reserved_key = reserved["keys"][0]["api_key"]
    # 1,000 tokens/min: two 400-token requests drain it, and it refills 405 tokens only after ~24 s.
    await execute(gateway, SET_REGION_LIMIT_SQL, "ap-south", 1_000)
    try:
        async def flood_is_shed():
            status, _, body = await _raw_chat(gateway, flood, 400)
            return status == 429 and body["error"]["code"] == "server_busy"

        await wait_for(flood_is_shed, "the serverless flood to be shed")
        for _ in range(10):
            assert (await _chat(gateway, reserved_key, 100)).http_response.status_code == 200
        status, headers, body = await _raw_chat(gateway, flood, 400)
        assert (status, body["error"]["code"], body["error"]["type"]) == (429, "server_busy", "server_error")
        assert int(headers["retry-after"]) >= 1
    finally:
        await execute(gateway, SET_REGION_LIMIT_SQL, "ap-south", None)

        async def serverless_flows_again():
            return (await _raw_chat(gateway, flood, 5))[0] == 200

        await wait_for(serverless_flows_again, "the region limit to be lifted")


@pytest.mark.parametrize(("sql", "level"), [
    ("UPDATE environments SET quota_tokens_per_day = 100 WHERE env_id = $1", "environment"),
    ("UPDATE orgs SET quota_tokens_per_hour = 100 WHERE org_id = $1", "organization"),
])
async def test_used_up_quota_is_refused_with_403_quota_exceeded(gateway, sql, level):
    tenant = await limited_tenant(gateway)
    target = tenant["env_id"] if "environments" in sql else tenant["org_id"]
    await execute(gateway, sql, uuid.UUID(target))
    api_key = tenant["keys"][0]["api_key"]
    raw = await _chat(gateway, api_key, 150)  # under quota when it starts; its usage crosses the quota
    assert raw.http_response.status_code == 200

    async def refused():
        status, _, body = await _raw_chat(gateway, api_key, 5)
        return body if status == 403 else None

    body = await wait_for(refused, "the quota to be used up after settlement")
    assert body["error"]["code"] == "quota_exceeded" and body["error"]["type"] == "insufficient_quota"
    assert level in body["error"]["message"]
    # The quota counted what the ledger bills (the probes admitted before it was crossed included).
    key_id = tenant["keys"][0]["key_id"]
    scope, period = ("env", "d") if level == "environment" else ("org", "h")

    async def counted_as_billed():
        _, billed = await ledger_for_key(gateway, key_id)
        return billed >= raw.parse().usage.total_tokens and \
            await quota_counted(gateway, tenant["org_id"], scope, target, period) == billed

    await wait_for(counted_as_billed, "quota counters equal to the ledger")


def _service_pid(port: int) -> int:
    """The pid of this stack's rate-limit service (found by its unique listen port)."""
    import subprocess

    out = subprocess.run(["pgrep", "-f", f"serve ratelimit --listen 127.0.0.1:{port}"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


async def test_unanswering_rate_limit_service_fails_closed_with_openai_503(rls_gateway):
    """Admission "rls": Envoy's ratelimit filter times out on the service -> 503 (failure_mode_deny)."""
    import os
    import signal

    gateway = rls_gateway
    tenant = await limited_tenant(gateway)
    pid = _service_pid(gateway["ports"]["ratelimit"])
    os.kill(pid, signal.SIGSTOP)  # the service hangs: Envoy's call times out
    try:
        status, _, body = await _raw_chat(gateway, tenant["keys"][0]["api_key"], 5)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 503
    assert body["error"]["code"] == "service_unavailable" and body["error"]["type"] == "server_error"

    async def flows_again():
        return (await _raw_chat(gateway, tenant["keys"][0]["api_key"], 5))[0] == 200

    await wait_for(flows_again, "the rate limiter to answer again")


async def test_rls_admission_refuses_with_the_same_429_and_headers(rls_gateway):
    """Admission "rls" keeps working: x-ratelimit-* on success, the layer-naming 429 with retry-after."""
    gateway = rls_gateway
    tenant = await limited_tenant(gateway, key=(200, None, None))
    api_key = tenant["keys"][0]["api_key"]
    status, headers, _ = await _raw_chat(gateway, api_key, 150)
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "200"
    status, headers, body = await _raw_chat(gateway, api_key, 150)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and "API key" in body["error"]["message"]
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-limit-tokens"] == "200"


async def test_redis_unavailable_with_a_fail_closed_layer_is_refused_with_openai_503(gateway):
    """Admission in ext_authz: the limiter cannot reach Redis and a layer that limits this key is fail-closed
    -> 503 (the same answer Envoy gave when `serve ratelimit` could not answer)."""
    tenant = await limited_tenant(gateway, key=(100_000, None, None))
    api_key = tenant["keys"][0]["api_key"]
    assert (await _raw_chat(gateway, api_key, 5))[0] == 200  # identity now cached in authz's process
    await execute(gateway, "UPDATE rate_limit_layers SET fail_open = false WHERE layer = $1", "key")
    redis = aioredis.from_url(gateway["redis_url"])
    try:
        async def refused():
            await redis.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # Redis stops answering clients
            status, _, body = await _raw_chat(gateway, api_key, 5)
            await redis.execute_command("CLIENT", "UNPAUSE")
            return body if status == 503 else None

        body = await wait_for(refused, "the fail-closed policy to apply")
        assert body["error"]["code"] == "service_unavailable" and body["error"]["type"] == "server_error"
    finally:
        await execute(gateway, "UPDATE rate_limit_layers SET fail_open = true WHERE layer = $1", "key")
        await redis.aclose()

    async def flows_again():
        return (await _raw_chat(gateway, api_key, 5))[0] == 200

    await wait_for(flows_again, "the limiter to answer again")


async def test_environment_caps_request_size_and_max_tokens_per_request(gateway):
    tenant = await limited_tenant(gateway)
    await execute(gateway, "UPDATE environments SET max_request_bytes = 400, max_tokens_per_request = 50 "
                  "WHERE env_id = $1", uuid.UUID(tenant["env_id"]))
    api_key = tenant["keys"][0]["api_key"]

    async def capped():
        status, _, body = await _raw_chat(gateway, api_key, 51)
        return body if status == 400 else None

    body = await wait_for(capped, "the environment's caps to apply")
    assert body["error"]["param"] == "max_tokens" and "50" in body["error"]["message"]
    assert (await _chat(gateway, api_key, 50)).http_response.status_code == 200
    with pytest.raises(openai.APIStatusError) as too_large:
        await client(gateway, api_key).chat.completions.create(
            model="llama-3-8b", messages=[{"role": "user", "content": "x" * 500}], max_tokens=5)
    assert too_large.value.status_code == 413 and too_large.value.code == "request_too_large"


async def test_shadowed_key_limit_is_logged_but_never_refuses(gateway):
    tenant = await limited_tenant(gateway, key=(None, 1, None))
    await execute(gateway, "UPDATE api_keys SET rate_limit_shadow = true WHERE key_id = $1",
                  uuid.UUID(tenant["keys"][0]["key_id"]))
    api_key = tenant["keys"][0]["api_key"]
    for _ in range(3):  # 1 request/min, shadowed: all pass
        assert (await _chat(gateway, api_key, 5)).http_response.status_code == 200
    # The gate logs in the process that decides: ext_authz (admission "authz", the default here).
    log = (Path(gateway["state_dir"]) / "logs" / "authz.log").read_text()
    assert f"key={tenant['keys'][0]['key_id']} layer=key limit=requests_per_min" in log


async def test_one_rule_in_shadow_mode_is_logged_while_its_layer_keeps_refusing(gateway):
    # Rolling out a new 100 tokens/min rule on a key whose 3 requests/min limit is already enforced.
    tenant = await limited_tenant(gateway, key=(100, 3, None))
    key_id = tenant["keys"][0]["key_id"]
    await execute(gateway, "UPDATE api_keys SET rate_limit_shadow_limits = '{tokens_per_min}' WHERE key_id = $1",
                  uuid.UUID(key_id))
    api_key = tenant["keys"][0]["api_key"]
    for _ in range(3):  # ~60 tokens reserved each: over 100 tokens/min from the second on, yet admitted
        assert (await _chat(gateway, api_key, 50)).http_response.status_code == 200
    status, _, body = await _raw_chat(gateway, api_key, 50)
    assert status == 429 and "requests per minute" in body["error"]["message"]
    log = (Path(gateway["state_dir"]) / "logs" / "authz.log").read_text()
    assert f"key={key_id} layer=key limit=tokens_per_min" in log


async def _set_chat_nodes(gateway: dict, **config) -> None:
    async with aiohttp.ClientSession() as http:
        for node in gateway["demo_nodes"]:
            if node["model"] == "llama-3-8b":
                async with http.post(f"{node['url']}/sim/config", json=config) as response:
                    assert response.status == 200


async def test_concurrency_lease_is_held_while_streaming_and_released_at_settlement(gateway):
    tenant = await limited_tenant(gateway, key=(None, None, 1))
    api = client(gateway, tenant["keys"][0]["api_key"])
    await _set_chat_nodes(gateway, tokens_per_sec=20)  # a 200-token stream would take 10 s
    try:
        stream = await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=200,
                                                   stream=True)
        await stream.__anext__()
        with pytest.raises(openai.RateLimitError) as refused:
            await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5)
        assert "concurrent requests" in refused.value.message
        await stream.close()  # the client goes away mid-stream: settlement still releases the lease
    finally:
        await _set_chat_nodes(gateway, tokens_per_sec=0)

    async def lease_released():
        try:
            await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5)
            return True
        except openai.RateLimitError:
            return False

    await wait_for(lease_released, "settlement to release the lease")
