"""The response path through the real gateway (Envoy's Lua filter, usage.lua): streams exactly as OpenAI
sends them however the node cuts its writes, node errors in OpenAI's shape, and concurrency leases near their limit
freed before the client sees the end of its response (the others at settlement, waited for by admission)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import aiohttp
import asyncpg
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from crosslogic.ratelimit.engine import org_tag
from crosslogic.sim import tokens
from crosslogic.store import tenancy
from tests.gateway_helpers import client, ledger_row, set_chat_nodes
from tests.ratelimit_helpers import charged, ledger_for_key, limited_tenant, wait_for

MESSAGES = [{"role": "user", "content": "Tell me something short"}]
PROMPT = tokens.chat_prompt_tokens(MESSAGES)


async def _post(gateway: dict, path: str, body: dict, api_key: str | None = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as http, http.post(
        f"{gateway['gateway_url']}{path}", json=body,
        headers={"authorization": f"Bearer {api_key or gateway['api_key']}"},
    ) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


def sse_payloads(body: bytes) -> list:
    """The events of an SSE body, decoded, checking OpenAI's framing: `data: <payload>\\n\\n`, `[DONE]` last."""
    assert body.endswith(b"\n\n")
    events = body.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    assert events[-1] == b"data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def _chat(max_tokens: int, **extra) -> dict:
    return {"model": "llama-3-8b", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True, **extra}


async def _ledger_usage(gateway: dict, request_id: str) -> tuple[int, int]:
    row = await ledger_row(gateway["database_url"], request_id)
    return row["prompt_tokens"], row["completion_tokens"]


# ------------------------------------------------------------------------------------ what the client sees


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
async def test_a_stream_without_include_usage_has_no_usage_anywhere_as_with_openai(gateway, path):
    body = _chat(4) if path == "/chat/completions" else {"model": "llama-3-8b", "prompt": "one two three",
                                                         "max_tokens": 4, "stream": True}
    status, headers, raw = await _post(gateway, path, body)
    assert status == 200
    chunks = sse_payloads(raw)
    assert not any("usage" in c for c in chunks)
    assert all(c["choices"] for c in chunks)  # no usage-only final chunk
    prompt = PROMPT if path == "/chat/completions" else tokens.count_prompt_tokens("one two three")
    assert await _ledger_usage(gateway, headers["x-request-id"]) == (prompt, 4)  # billed all the same


async def test_a_stream_with_include_usage_has_null_usage_then_one_usage_chunk(gateway):
    status, headers, raw = await _post(gateway, "/chat/completions", _chat(3, stream_options={"include_usage": True}))
    chunks = sse_payloads(raw)
    assert all("usage" in c and c["usage"] is None and c["choices"] for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (PROMPT, 3, PROMPT + 3)
    assert await _ledger_usage(gateway, headers["x-request-id"]) == (PROMPT, 3)


async def test_the_openai_client_sees_usage_only_on_the_last_chunk(gateway):
    stream = await client(gateway).chat.completions.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    plain = await client(gateway).chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=3,
                                                          stream=True)
    assert not any("usage" in c.model_fields_set for c in [c async for c in plain])


async def test_a_client_asking_for_continuous_usage_stats_gets_vllms_cumulative_usage(gateway):
    status, headers, raw = await _post(gateway, "/chat/completions", _chat(
        3, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    chunks = sse_payloads(raw)
    assert [(c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) for c in chunks] == [
        (PROMPT, 0), (PROMPT, 1), (PROMPT, 2), (PROMPT, 3), (PROMPT, 3)]
    assert await _ledger_usage(gateway, headers["x-request-id"]) == (PROMPT, 3)


def _comparable(chunks: list[dict]) -> list[dict]:
    return [{**c, "id": "", "created": 0} for c in chunks]


@pytest.mark.parametrize("options", [None, {"include_usage": True}, {"include_usage": True,
                                                                     "continuous_usage_stats": True}],
                         ids=["no-usage", "include-usage", "continuous-usage"])
async def test_a_node_writing_events_in_odd_fragments_changes_nothing_the_client_sees(gateway, options):
    extra = {"stream_options": options} if options else {}
    _, _, whole = await _post(gateway, "/chat/completions", _chat(6, **extra))
    await set_chat_nodes(gateway, sse_fragment_bytes=7)  # every event split across several Envoy body chunks
    try:
        _, headers, fragmented = await _post(gateway, "/chat/completions", _chat(6, **extra))
    finally:
        await set_chat_nodes(gateway, sse_fragment_bytes=0)
    assert _comparable(sse_payloads(fragmented)) == _comparable(sse_payloads(whole))
    assert await _ledger_usage(gateway, headers["x-request-id"]) == (PROMPT, 6)


async def _node_stats(gateway: dict) -> list[dict]:
    async with aiohttp.ClientSession() as http:
        stats = []
        for node in gateway["demo_nodes"]:
            if node["model"] == "llama-3-8b":
                async with http.get(f"{node['url']}/sim/stats") as response:
                    stats.append(await response.json())
        return stats


async def test_stream_events_reach_the_client_while_the_node_is_still_generating(gateway):
    await set_chat_nodes(gateway, tokens_per_sec=20, sse_fragment_bytes=7)  # 20 tokens: about a second
    try:
        async with aiohttp.ClientSession() as http, http.post(
            f"{gateway['gateway_url']}/chat/completions", json=_chat(20),
            headers={"authorization": f"Bearer {gateway['api_key']}"},
        ) as response:
            seen = []
            async for line in response.content:
                if line.startswith(b"data: {") and b'"content":"tok' in line:
                    seen.append(line)
                    if len(seen) == 2:
                        running = sum(s["requests_running"] for s in await _node_stats(gateway))
                        assert running >= 1  # not buffered until the end: the node is mid-generation
            assert len(seen) == 20
    finally:
        await set_chat_nodes(gateway, tokens_per_sec=0, sse_fragment_bytes=0)


# ------------------------------------------------------------------------------------------- node errors


async def test_a_node_rejecting_the_request_answers_in_openai_shape_with_its_message(gateway):
    too_long = [{"role": "user", "content": "word " * 9000}]  # within the gateway's estimate, over the node's 8192
    with pytest.raises(openai.BadRequestError) as rejected:
        await client(gateway).chat.completions.create(model="llama-3-8b", messages=too_long, max_tokens=5)
    error = rejected.value
    assert error.code == "invalid_request_error" and error.type == "invalid_request_error"
    assert "maximum context length is 8192 tokens" in error.message
    assert error.response.headers["content-type"] == "application/json"
    status, _, raw = await _post(gateway, "/chat/completions", {**_chat(5), "messages": too_long})
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"  # a stream request too


async def test_an_engine_failure_mid_stream_reaches_the_client_as_an_openai_error_event(gateway):
    await set_chat_nodes(gateway, engine_error_after_tokens=2)
    try:
        status, headers, raw = await _post(gateway, "/chat/completions", _chat(6))
        with pytest.raises(openai.APIError) as failed:
            stream = await client(gateway).chat.completions.create(model="llama-3-8b", messages=MESSAGES,
                                                                   max_tokens=6, stream=True)
            async for _ in stream:
                pass
    finally:
        await set_chat_nodes(gateway, engine_error_after_tokens=None)
    assert status == 200
    *chunks, error = sse_payloads(raw)
    assert error == {"error": {"message": "The model server failed to process the request. Please retry.",
                               "type": "server_error", "param": None, "code": "bad_gateway"}}
    assert not any("usage" in c for c in chunks)
    assert "failed to process the request" in failed.value.message
    assert await _ledger_usage(gateway, headers["x-request-id"]) == (PROMPT, 2)  # what the node made


async def test_a_node_500_is_a_502_server_error_without_its_words(gateway):
    await set_chat_nodes(gateway, engine_error_after_tokens=0)
    try:
        status, headers, raw = await _post(gateway, "/chat/completions", {**_chat(3), "stream": False})
    finally:
        await set_chat_nodes(gateway, engine_error_after_tokens=None)
    assert status == 502 and headers["content-type"] == "application/json"
    assert json.loads(raw) == {"error": {"message": "The model server failed to process the request. Please retry.",
                                         "type": "server_error", "param": None, "code": "bad_gateway"}}


BROKEN_REPLIES = {  # what a misbehaving node (or a proxy in front of it) answers, by the prompt
    "html-502": (502, "text/html", "<html><body><h1>502 Bad Gateway</h1>nginx at {addr}</body></html>"),
    "empty-503": (503, None, ""),
    "text-500": (500, "text/plain", 'Traceback (most recent call last):\n  File "/srv/{addr}/app.py"\nKeyError'),
    "json-401": (401, "application/json", '{"error": "invalid token for {addr}"}'),
    "html-200": (200, "text/html", "<html>login page of {addr}</html>"),
    "json-429": (429, "application/json", '{"object": "error", "message": "busy", "code": 429}'),
}
EXPECTED = {"html-502": (502, "bad_gateway"), "empty-503": (503, "service_unavailable"),
            "text-500": (502, "bad_gateway"), "json-401": (502, "bad_gateway"), "html-200": (502, "bad_gateway"),
            "json-429": (429, "server_busy")}


@contextlib.asynccontextmanager
async def broken_node(gateway: dict):
    """A raw HTTP server registered as the only node of a new model; it answers BROKEN_REPLIES."""
    address: list[str] = []

    async def reply(request: web.Request) -> web.Response:
        body = await request.json()
        status, content_type, text = BROKEN_REPLIES[body["messages"][0]["content"]]
        headers = {"content-type": content_type} if content_type else {}
        return web.Response(status=status, body=text.replace("{addr}", address[0]).encode(), headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reply)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    address.append(f"127.0.0.1:{port}")
    model, node = "broken-" + uuid.uuid4().hex[:6], "broken-node-" + uuid.uuid4().hex[:6]
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        await tenancy.add_model(conn, model, kind="chat", max_output_tokens=64, default_max_tokens=8)
        await tenancy.add_node(conn, node, "ap-south", "127.0.0.1", port, [model])
        yield model, address[0]
    finally:
        await conn.execute("UPDATE nodes SET status = 'dead' WHERE name = $1", node)
        await conn.close()
        await runner.cleanup()


async def test_whatever_a_broken_node_answers_the_client_gets_openai_json(gateway):
    async with broken_node(gateway) as (model, address):
        async def routable():  # the new pool reaches Envoy over ADS
            status, _, raw = await _post(gateway, "/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": "html-502"}]})
            return status == 502 and b"bad_gateway" in raw

        await wait_for(routable, "the broken node's pool in Envoy")
        for behaviour, (want_status, want_code) in EXPECTED.items():
            for stream in (False, True):
                status, headers, raw = await _post(gateway, "/chat/completions", {
                    "model": model, "messages": [{"role": "user", "content": behaviour}], "stream": stream})
                assert (status, headers["content-type"]) == (want_status, "application/json"), (behaviour, raw)
                error = json.loads(raw)["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["code"] == want_code and error["type"] == "server_error"
                assert address not in raw.decode() and "Traceback" not in raw.decode() and "nginx" not in raw.decode()
                if want_status == 429:
                    assert headers["retry-after"] == "1"
                row = await ledger_row(gateway["database_url"], headers["x-request-id"])
                # The ledger records what the client saw, and bills nothing for it.
                assert (row["status_code"], row["usage_source"], row["cost_microdollars"]) == (want_status, "none",
                                                                                               0), behaviour


# ------------------------------------------------------------------------------------------------ leases


async def _leases_held(gateway: dict, org_id: str, key_id: str) -> int:
    redis = aioredis.from_url(gateway["redis_url"])
    try:
        return sum([await redis.zcard(f"{org_tag(org_id)}:{layer}:{ident}:lease")
                    for layer, ident in (("org", org_id), ("key", key_id))])
    finally:
        await redis.aclose()


async def test_back_to_back_requests_at_the_concurrency_limit_are_never_refused(gateway):
    tenant = await limited_tenant(gateway, key=(None, None, 1))
    key = tenant["keys"][0]
    api = client(gateway, key["api_key"])
    for i in range(50):
        kind = i % 3
        if kind == 0:
            await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=3)
        else:
            options = {"include_usage": True} if kind == 2 else None
            stream = await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=3,
                                                       stream=True, stream_options=options)
            async for _ in stream:
                pass
        # At its limit of 1, every lease is freed before the client saw the end of its response, not when the
        # access log is settled (~0.1-0.3 s later): the org's lease of the same request with it.
        assert await _leases_held(gateway, tenant["org_id"], key["key_id"]) == 0
    # (Any 429 above would have raised openai.RateLimitError.) Tokens still settle exactly, once each.

    async def all_logged():
        count, used = await ledger_for_key(gateway, key["key_id"])
        return used if count == 50 else None

    used = await wait_for(all_logged, "every request in the ledger")
    assert used == 50 * (PROMPT + 3)

    async def settled():
        return await charged(gateway, tenant["org_id"], "key", key["key_id"]) == used

    await wait_for(settled, "settlement to charge exactly the ledger")


async def test_the_concurrency_limit_still_holds_exactly_under_parallel_load(gateway):
    tenant = await limited_tenant(gateway, key=(None, None, 3))
    key = tenant["keys"][0]
    api = client(gateway, key["api_key"])
    await set_chat_nodes(gateway, tokens_per_sec=10)  # 20 tokens: two seconds in flight
    streams, refused = [], 0
    try:
        async def start():
            nonlocal refused
            try:
                stream = await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=20,
                                                           stream=True)
                await stream.__anext__()
                streams.append(stream)
            except openai.RateLimitError as error:
                assert "concurrent requests" in error.message
                refused += 1

        await asyncio.gather(*(start() for _ in range(8)))
        assert (len(streams), refused) == (3, 5)
        assert await _leases_held(gateway, tenant["org_id"], key["key_id"]) == 3 + 3  # key and org layers
        for stream in streams:
            async for _ in stream:
                pass
    finally:
        await set_chat_nodes(gateway, tokens_per_sec=0)
    # The moment the streams ended, the next three are admitted (a refusal would raise): the two leases taken at
    # or above half the limit were freed as their streams ended, the first one's is freed by settlement, which
    # the third request's admission waits for (CROSSLOGIC_CONCURRENCY_WAIT_MS) rather than refusing it.
    await asyncio.gather(*(api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=2)
                           for _ in range(3)))

    async def all_freed():
        return await _leases_held(gateway, tenant["org_id"], key["key_id"]) == 0

    await wait_for(all_freed, "settlement to free the remaining leases")
