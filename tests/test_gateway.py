"""The gateway spine end to end: official openai client -> Envoy -> ext_authz -> simulated vLLM -> ledger."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
import asyncpg
import openai
import pytest

from crosslogic.store import tenancy
from tests.gateway_helpers import client, ledger_row

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say three words please"}]
# What the node reports, by the simulator's rule (crosslogic/sim/tokens.py), worked out by hand: words + 4 per
# message, + 2 per conversation = (3 + 4) + (4 + 4) + 2.
PROMPT_TOKENS = 17


async def test_chat_completion_usage_lands_in_ledger_exactly(gateway):
    raw = await client(gateway).chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=7)
    completion = raw.parse()
    expected_prompt = PROMPT_TOKENS
    assert completion.usage.prompt_tokens == expected_prompt
    assert completion.usage.completion_tokens == 7
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6"

    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (expected_prompt, 7,
                                                                                       expected_prompt + 7)
    assert row["usage_source"] == "reported"
    assert str(row["org_id"]) == gateway["org_id"] and str(row["key_id"]) == gateway["key_id"]
    assert (row["model"], row["region"], row["endpoint"], row["streamed"], row["status_code"]) == (
        "llama-3-8b", "ap-south", "chat.completions", False, 200)
    # $0.05 / $0.08 per 1M tokens, rounded half up once, in micro-dollars.
    assert row["cost_microdollars"] == (expected_prompt * 50_000 + 7 * 80_000 + 500_000) // 1_000_000


async def test_streaming_chat_with_include_usage_gets_usage_chunk_and_exact_ledger(gateway):
    raw = await client(gateway).chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT_TOKENS, 5)
    assert row["streamed"] and row["usage_source"] == "reported"


async def test_streaming_without_include_usage_is_still_billed_and_client_sees_no_usage_chunk(gateway):
    raw = await client(gateway).chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=4, stream=True)
    chunks = [chunk async for chunk in raw.parse()]
    # Code written against OpenAI's contract indexes choices[0] on every chunk: it must not break.
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok3"
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT_TOKENS, 4)


async def test_raw_sse_framing_ends_with_done(gateway):
    body = {"model": "llama-3-8b", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    async with aiohttp.ClientSession() as http, http.post(
        f"{gateway['gateway_url']}/chat/completions", json=body,
        headers={"authorization": f"Bearer {gateway['api_key']}"},
    ) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payload = (await response.read()).decode()
    events = [e for e in payload.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


async def test_completions_usage_in_ledger(gateway):
    raw = await client(gateway).completions.with_raw_response.create(
        model="llama-3-8b", prompt="Once upon a time there was", max_tokens=6)
    completion = raw.parse()
    assert completion.usage.prompt_tokens == 6
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["endpoint"]) == (6, 6, "completions")


async def test_streaming_completions_usage_in_ledger(gateway):
    raw = await client(gateway).completions.with_raw_response.create(
        model="llama-3-8b", prompt="one two three", max_tokens=3, stream=True)
    text = "".join([c.choices[0].text async for c in raw.parse()])
    assert text == "tok0 tok1 tok2"
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["streamed"]) == (3, 3, True)


async def test_embeddings_usage_in_ledger(gateway):
    raw = await client(gateway).embeddings.with_raw_response.create(
        model="bge-small", input=["alpha beta", "gamma delta epsilon"])
    result = raw.parse()
    assert len(result.data) == 2 and result.usage.prompt_tokens == 5
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["endpoint"]) == (5, 0, "embeddings")


async def test_models_lists_what_the_environment_may_use(gateway):
    models = await client(gateway).models.list()
    assert {m.id for m in models.data} == {"llama-3-8b", "bge-small"}
    assert (await client(gateway).models.retrieve("llama-3-8b")).id == "llama-3-8b"


async def test_client_disconnect_mid_stream_bills_tokens_generated_so_far(gateway):
    node_urls = [n["url"] for n in gateway["demo_nodes"] if n["model"] == "llama-3-8b"]
    async with aiohttp.ClientSession() as http:
        for url in node_urls:  # slow generation so the client can leave half-way
            await http.post(f"{url}/sim/config", json={"tokens_per_sec": 50})
        try:
            body = {"model": "llama-3-8b", "messages": MESSAGES, "max_tokens": 200, "stream": True}
            async with http.post(f"{gateway['gateway_url']}/chat/completions", json=body,
                                 headers={"authorization": f"Bearer {gateway['api_key']}"}) as response:
                request_id = response.headers["x-request-id"]
                seen = 0
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        seen += 1
                    if seen >= 6:
                        break  # leaving the context closes the connection mid-stream
        finally:
            for url in node_urls:
                await http.post(f"{url}/sim/config", json={"tokens_per_sec": 0})
    row = await ledger_row(gateway["database_url"], request_id)
    assert row["usage_source"] == "partial"
    assert row["prompt_tokens"] == PROMPT_TOKENS
    assert 5 <= row["completion_tokens"] < 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, None),  # OpenAI's code is null for unparsable JSON too
        (json.dumps({"model": "llama-3-8b"}).encode(), 400, "missing_required_parameter"),
        (json.dumps({"model": "llama-3-8b", "messages": MESSAGES, "max_tokens": 10**6}).encode(), 400,
         "invalid_value"),
        (json.dumps({"model": "gpt-9", "messages": MESSAGES}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "bge-small", "messages": MESSAGES}).encode(), 404, "model_not_found"),
    ],
    ids=["invalid-json", "missing-messages", "max-tokens-over-cap", "unknown-model", "embedding-model-for-chat"],
)
async def test_bad_requests_get_openai_shaped_errors(gateway, body, status, code):
    async with aiohttp.ClientSession() as http, http.post(
        f"{gateway['gateway_url']}/chat/completions", data=body,
        headers={"authorization": f"Bearer {gateway['api_key']}", "content-type": "application/json"},
    ) as response:
        payload = await response.json(content_type=None)
    assert response.status == status
    assert payload["error"]["code"] == code and payload["error"]["message"] and payload["error"]["type"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}


async def test_openai_client_raises_typed_errors(gateway):
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        await client(gateway, api_key="clsk_live_" + "0" * 32).models.list()
    assert unauthenticated.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as missing:
        await client(gateway).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await client(gateway).chat.completions.create(model="llama-3-8b", messages=[])


async def test_missing_and_malformed_keys_are_401(gateway):
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic abc"}):
            async with http.get(f"{gateway['gateway_url']}/models", headers=headers) as response:
                payload = await response.json(content_type=None)
            assert response.status == 401 and payload["error"]["code"] == "invalid_api_key"


async def test_oversized_body_is_413_json(gateway):
    huge = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    async with aiohttp.ClientSession() as http, http.post(
        f"{gateway['gateway_url']}/chat/completions", json=huge,
        headers={"authorization": f"Bearer {gateway['api_key']}"},
    ) as response:
        payload = await response.json(content_type=None)
    assert response.status == 413 and payload["error"]["code"] == "request_too_large"


async def test_unknown_url_is_404_json(gateway):
    async with aiohttp.ClientSession() as http, http.get(
        f"{gateway['gateway_base']}/v1/nothing-here", headers={"authorization": f"Bearer {gateway['api_key']}"},
    ) as response:
        payload = await response.json(content_type=None)
    assert response.status == 404 and payload["error"]["code"] == "unknown_url"


async def _new_tenant(gateway: dict, secret: bytes) -> dict:
    """A fresh org/env/key so tests that suspend or revoke never disturb the shared demo tenant."""
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        name = "t-" + uuid.uuid4().hex[:8]
        org = await tenancy.create_org(conn, name, region_preferences=["ap-south"])
        env = await tenancy.create_env(conn, org.org_id, "prod", region="ap-south")
        key, plaintext = await tenancy.create_key(conn, secret, org.org_id, env.env_id, name="k")
        return {"org_id": str(org.org_id), "env_id": str(env.env_id), "key_id": str(key.key_id), "api_key": plaintext}
    finally:
        await conn.close()


def _secret(gateway: dict) -> bytes:
    from pathlib import Path

    return (Path(gateway["state_dir"]) / "key_secret").read_text().strip().encode()


async def _status_until(gateway: dict, api_key: str, wanted: int, within_s: float) -> float:
    """Seconds until GET /v1/models answers `wanted` (polled; the bound is the feature under test)."""
    start = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{gateway['gateway_url']}/models",
                                headers={"authorization": f"Bearer {api_key}"}) as response:
                if response.status == wanted:
                    return time.monotonic() - start
            if time.monotonic() - start > within_s:
                raise AssertionError(f"status never became {wanted}")
            await asyncio.sleep(0.02)


async def test_revoked_key_is_refused_within_one_second(gateway):
    tenant = await _new_tenant(gateway, _secret(gateway))
    await _status_until(gateway, tenant["api_key"], 200, 5)  # now cached in every tier
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        await tenancy.revoke_key(conn, tenant["key_id"])
    finally:
        await conn.close()
    await _status_until(gateway, tenant["api_key"], 401, 1.0)


@pytest.mark.parametrize("level", ["org", "env", "key"])
async def test_suspended_tenant_gets_403_tenant_suspended(gateway, level):
    tenant = await _new_tenant(gateway, _secret(gateway))
    await _status_until(gateway, tenant["api_key"], 200, 5)
    table, column = {"org": ("orgs", "org_id"), "env": ("environments", "env_id"),
                     "key": ("api_keys", "key_id")}[level]
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        entity_id = uuid.UUID(tenant[f"{level}_id"])
        await conn.execute(f"UPDATE {table} SET status = 'suspended' WHERE {column} = $1", entity_id)
    finally:
        await conn.close()
    await _status_until(gateway, tenant["api_key"], 403, 1.0)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await client(gateway, api_key=tenant["api_key"]).chat.completions.create(model="llama-3-8b", messages=MESSAGES)
    assert denied.value.code == "tenant_suspended"


async def test_spoofed_internal_headers_cannot_move_usage_to_another_org(gateway):
    victim = await _new_tenant(gateway, _secret(gateway))
    spoof = {"x-clp-org": victim["org_id"], "x-clp-env": victim["env_id"], "x-clp-key": victim["key_id"],
             "x-clp-route": "ap-south/llama-3-8b", "x-clp-usage-mode": "json", "x-clp-anything": "1"}
    raw = await client(gateway, default_headers=spoof).chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=3)
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert str(row["org_id"]) == gateway["org_id"] and str(row["key_id"]) == gateway["key_id"]
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM usage_records WHERE org_id = $1",
                                   uuid.UUID(victim["org_id"])) == 0
    finally:
        await conn.close()


async def test_client_cannot_choose_the_request_id_that_keys_the_ledger(gateway):
    fixed = "11111111-2222-3333-4444-555555555555"
    ids = []
    for _ in range(2):
        raw = await client(gateway, default_headers={"x-request-id": fixed}).chat.completions.with_raw_response.create(
            model="llama-3-8b", messages=MESSAGES, max_tokens=1)
        ids.append(raw.headers["x-request-id"])
    assert fixed not in ids and ids[0] != ids[1]
    for request_id in ids:
        await ledger_row(gateway["database_url"], request_id)


async def test_errors_never_leak_node_addresses(gateway):
    async with aiohttp.ClientSession() as http:
        for url in (f"{gateway['gateway_url']}/chat/completions", f"{gateway['gateway_base']}/x"):
            async with http.post(url, data=b"{", headers={"authorization": f"Bearer {gateway['api_key']}"}) as r:
                text = await r.text()
            for node in gateway["demo_nodes"]:
                assert node["url"].split("//")[1] not in text


async def test_a_model_and_node_added_while_running_become_routable(gateway):
    from crosslogic.sim.server import SimulatorConfig, running_simulator

    async with running_simulator(SimulatorConfig(models=("late-model",), node_name="late-1"),
                                 host="127.0.0.1") as sim:
        conn = await asyncpg.connect(gateway["database_url"])
        try:
            await tenancy.add_model(conn, "late-model", kind="chat", max_output_tokens=64, default_max_tokens=8)
            await tenancy.add_node(conn, "late-1", "ap-south", "127.0.0.1", sim.port, ["late-model"])
        finally:
            await conn.close()
        api = client(gateway)
        deadline = time.monotonic() + 15
        while True:  # new cluster + its endpoints must reach Envoy over ADS, without a restart
            try:
                completion = await api.chat.completions.create(model="late-model", messages=MESSAGES, max_tokens=2)
                break
            except (openai.InternalServerError, openai.NotFoundError):
                assert time.monotonic() < deadline, "the new pool never became routable"
                await asyncio.sleep(0.05)
        assert completion.usage.completion_tokens == 2
        conn = await asyncpg.connect(gateway["database_url"])
        try:
            await conn.execute("UPDATE nodes SET status = 'dead' WHERE name = 'late-1'")
        finally:
            await conn.close()
