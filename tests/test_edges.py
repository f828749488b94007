"""What a client gets from Envoy itself and from the edges of the API (issue 9: items 2, 3, 6, 11, 12).

Raw sockets, so the requests are exactly the malformed, oversized or slow ones no client library would send,
and the replies are seen byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import asyncpg
import pytest

from crosslogic.sim.server import SimulatorConfig, running_simulator
from crosslogic.store import tenancy
from crosslogic.xds.model import GatewaySettings
from crosslogic.xds.resources import build_listener
from tests import raw_http
from tests.raw_http import request, send

CHAT = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


def _auth(gateway: dict) -> dict[str, str]:
    return {"authorization": f"Bearer {gateway['api_key']}"}


def _assert_nothing_internal(gateway: dict, reply: raw_http.RawResponse) -> None:
    names = [k for k, _ in reply.headers]
    assert not [n for n in names if n.startswith(("x-envoy-", "x-clp-"))], names
    assert reply.header("server") in (None, "crosslogic"), reply.header("server")
    for node in gateway["demo_nodes"]:
        host_port = node["url"].split("//")[1]
        assert host_port.encode() not in reply.raw and f":{host_port.rsplit(':')[1]}".encode() not in reply.raw


def _malformed(gateway: dict) -> dict[str, tuple[bytes, int]]:
    """Requests Envoy refuses on its own (its codec, its limits, its routes), with the status each should get."""
    auth = f"authorization: Bearer {gateway['api_key']}\r\n"
    chat_head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\n{auth}content-type: application/json\r\n"
    return {
        "200 headers": (request("GET", "/v1/models", [(f"x-h{i}", "v") for i in range(200)]), 431),
        "100 KB authorization": (request("GET", "/v1/models", {"authorization": "Bearer " + "a" * 100_000}), 431),
        "70 KB URL": (request("GET", "/v1/models?q=" + "a" * 70_000, _auth(gateway)), 431),
        "bad chunk size": ((chat_head + "transfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n").encode(), 400),
        "two content-lengths": ((chat_head + "content-length: 2\r\ncontent-length: 3\r\n\r\n{}").encode(), 400),
        "content-length and chunked": (
            (chat_head + "content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n").encode(), 400),
        "unknown transfer-encoding": ((chat_head + "transfer-encoding: gzip\r\n\r\n").encode(), 400),
        "non-numeric content-length": ((chat_head + "content-length: abc\r\n\r\n").encode(), 400),
        "lower-case method": (f"get /v1/models HTTP/1.1\r\nhost: g\r\n{auth}connection: close\r\n\r\n".encode(), 400),
        "missing host": (f"GET /v1/models HTTP/1.1\r\n{auth}connection: close\r\n\r\n".encode(), 400),
        "control byte in a header name": (request("GET", "/v1/models", [("x-b\x01d", "v")]), 400),
        "path without slash": (request("GET", "v1/models", _auth(gateway)), 400),
        "binary garbage": (b"\x00\x01\x02\xff garbage\r\n\r\n", 400),
        "websocket upgrade": (request("GET", "/v1/models", {**_auth(gateway), "upgrade": "websocket",
                                                             "connection": "upgrade"}), 400),
        "CONNECT": (f"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n{auth}\r\n".encode(), 404),
        "unknown URL": (request("GET", "/v1/nothing-here", _auth(gateway)), 404),
        "2 MiB body": (request("POST", "/v1/chat/completions", {**_auth(gateway), "content-type": "application/json"},
                               b'{"model":"llama-3-8b","messages":[{"role":"user","content":"' + b"x" * (2 << 20)
                               + b'"}]}'), 413),
    }


@pytest.mark.parametrize("case", list(_malformed({"api_key": "k"})))
def test_envoys_own_refusals_are_openai_json(gateway, case):
    data, status = _malformed(gateway)[case]
    reply = send(gateway, data)
    assert reply.status == status, reply.raw[:300]
    reply.openai_error()
    _assert_nothing_internal(gateway, reply)


def test_no_header_count_gives_a_5xx(gateway):
    """85-99 client headers plus the ones ext_authz adds used to cross Envoy's limit: an empty 500."""
    for count in range(0, 110, 3):
        reply = send(gateway, request("POST", "/v1/chat/completions",
                                      [*_auth(gateway).items(), ("content-type", "application/json"),
                                       *((f"x-extra-{i}", "v" * 10) for i in range(count))], CHAT))
        assert reply.status in (200, 431), (count, reply.raw[:300])
        if reply.status == 431:
            assert reply.openai_error()["code"] == "request_headers_too_large"


def test_header_bytes_near_the_limit_never_give_a_5xx(gateway):
    for kib in (50, 58, 59, 60, 61):
        reply = send(gateway, request("POST", "/v1/chat/completions", [
            *_auth(gateway).items(), ("content-type", "application/json"), ("x-pad", "p" * (kib * 1024 - 400))],
            CHAT))
        assert reply.status in (200, 431), (kib, reply.raw[:300])
        if reply.status == 431:
            reply.openai_error()


def test_http_1_0_clients_are_served(gateway):
    auth = f"authorization: Bearer {gateway['api_key']}\r\n"
    for host in ("", "host: g\r\n"):
        reply = send(gateway, f"GET /v1/models HTTP/1.0\r\n{host}{auth}\r\n".encode())
        assert reply.status == 200 and json.loads(reply.body)["object"] == "list"


def test_healthz_is_json(gateway):
    reply = send(gateway, request("GET", "/healthz", {}))
    assert reply.status == 200 and reply.header("content-type") == "application/json"
    assert json.loads(reply.body) == {"status": "ok"}


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1/models/", 404, "unknown_url"),
    ("GET", "/v1/modelsfoo", 404, "unknown_url"),
    ("GET", "/v1/models/no-such-model", 404, "model_not_found"),
    ("POST", "/v1/models", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ("PUT", "/v1/models/llama-3-8b", 405, "method_not_allowed"),
    ("DELETE", "/v1/models/llama-3-8b", 405, "method_not_allowed"),
    ("OPTIONS", "/v1/models", 405, "method_not_allowed"),
    ("PATCH", "/v1/models", 405, "method_not_allowed"),
])
def test_models_variants_are_openai_json(gateway, method, path, status, code):
    reply = send(gateway, request(method, path, _auth(gateway)))
    assert reply.status == status, reply.raw[:300]
    assert reply.openai_error()["code"] == code
    if status == 405:
        assert set(reply.header("allow").replace(" ", "").split(",")) == {"GET", "HEAD"}
    _assert_nothing_internal(gateway, reply)


def test_models_list_one_model_and_head(gateway):
    for path in ("/v1/models", "/v1/models?limit=5", "/v1/models/llama-3-8b"):
        reply = send(gateway, request("GET", path, _auth(gateway)))
        assert reply.status == 200 and json.loads(reply.body)
    head = send(gateway, request("HEAD", "/v1/models", _auth(gateway)))
    assert head.status == 200 and head.body == b""


def test_no_internal_header_or_node_address_reaches_a_client(gateway):
    stream = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                         "stream": True}).encode()
    json_headers = {**_auth(gateway), "content-type": "application/json"}
    for data in (
        request("POST", "/v1/chat/completions", json_headers, CHAT),
        request("POST", "/v1/chat/completions", json_headers, stream),
        request("POST", "/v1/completions", json_headers, json.dumps(
            {"model": "llama-3-8b", "prompt": "x", "max_tokens": 2}).encode()),
        request("POST", "/v1/embeddings", json_headers, json.dumps({"model": "bge-small", "input": "x"}).encode()),
        request("POST", "/v1/chat/completions", json_headers, b"{"),
        request("POST", "/v1/chat/completions", {"content-type": "application/json"}, CHAT),
        request("GET", "/v1/models", _auth(gateway)),
        request("GET", "/v1/models/nope", _auth(gateway)),
        request("GET", "/healthz", {}),
        request("GET", "/elsewhere", _auth(gateway)),
    ):
        reply = send(gateway, data)
        assert reply.status is not None and reply.status < 500, reply.raw[:300]
        _assert_nothing_internal(gateway, reply)


def test_the_listener_strips_internal_headers_after_every_filter():
    """The header filter is first in the chain, so the last to see every response, local replies included."""
    hcm = build_listener(GatewaySettings()).filter_chains[0].filters[0]
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

    config = http_connection_manager_pb2.HttpConnectionManager()
    hcm.typed_config.Unpack(config)
    assert config.http_filters[0].name == "envoy.filters.http.header_mutation"
    assert config.http_filters[-1].name == "envoy.filters.http.router"
    assert config.request_timeout.seconds > 0 and config.request_headers_timeout.seconds > 0


# --- slow clients (tight_gateway: headers 1 s, request 2 s, idle connection 2 s, node silence 2 s) ---------

def _drip(gateway: dict, head: bytes, dripped: bytes, every_s: float) -> tuple[int, raw_http.RawResponse]:
    """Sends `head`, then `dripped` one byte per `every_s`, until the server answers or closes. Returns the
    bytes it took before that, and what it said."""
    with raw_http.connect(gateway) as sock:
        sock.sendall(head)
        sock.settimeout(every_s)
        received = b""
        for sent, byte in enumerate(dripped):
            try:
                sock.sendall(bytes([byte]))
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return sent, raw_http.parse(received)
            if not chunk:
                return sent, raw_http.parse(received)
            received += chunk
            sock.settimeout(raw_http.READ_TIMEOUT_S)
            return sent, raw_http.parse(received + raw_http.read_until_closed(sock))
        return len(dripped), raw_http.parse(received)


def _cut_with_nothing_or_json_408(reply: raw_http.RawResponse) -> None:
    if reply.status is not None:
        assert reply.status == 408, reply.raw[:300]
        assert reply.openai_error()["code"] == "request_timeout"


def test_a_slowloris_dripping_headers_is_cut(tight_gateway):
    dripped = b"x-slow: " + b"a" * 400 + b"\r\n\r\n"  # 40 s at this pace, against a 1 s header bound
    sent, reply = _drip(tight_gateway, b"GET /v1/models HTTP/1.1\r\nhost: g\r\n", dripped, 0.1)
    assert sent < len(dripped)
    _cut_with_nothing_or_json_408(reply)


def test_a_body_dripped_slowly_is_cut_with_json_408(tight_gateway):
    body = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "x" * 400}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {tight_gateway['api_key']}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    sent, reply = _drip(tight_gateway, head, body, 0.1)
    assert sent < len(body) and reply.status == 408
    _cut_with_nothing_or_json_408(reply)


def test_a_body_that_never_comes_is_cut_with_json_408(tight_gateway):
    reply = send(tight_gateway, (f"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\nauthorization: Bearer "
                                 f"{tight_gateway['api_key']}\r\ncontent-length: 100\r\n\r\n").encode())
    assert reply.status == 408
    _cut_with_nothing_or_json_408(reply)


def test_idle_connections_are_closed(tight_gateway):
    with raw_http.connect(tight_gateway) as sock:
        assert sock.recv(1) == b""  # connected and silent: closed by the server, not by our read timeout
    with raw_http.connect(tight_gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: g\r\n\r\n")  # keep-alive, then nothing more
        reply = raw_http.parse(raw_http.read_until_closed(sock))
    assert reply.status == 200


@pytest.fixture(scope="module")
async def slow_model(tight_gateway):
    """A node of its own (4 tokens/s) for model `edge-slow`, routable through the tight gateway."""
    async with running_simulator(SimulatorConfig(models=("edge-slow",), node_name="edge-slow-1", tokens_per_sec=4),
                                 host="127.0.0.1") as sim:
        conn = await asyncpg.connect(tight_gateway["database_url"])
        try:
            await tenancy.add_model(conn, "edge-slow", kind="chat", max_output_tokens=64, default_max_tokens=8)
            await tenancy.add_node(conn, "edge-slow-1", "ap-south", "127.0.0.1", sim.port, ["edge-slow"])
        finally:
            await conn.close()
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:  # the pool must reach Envoy over ADS first
                async with http.post(f"{tight_gateway['gateway_url']}/chat/completions", headers=_auth(tight_gateway),
                                     json={"model": "edge-slow", "messages": [{"role": "user", "content": "x"}],
                                           "max_tokens": 1}) as response:
                    if response.status == 200:
                        break
                assert time.monotonic() < deadline, "edge-slow never became routable"
                await asyncio.sleep(0.1)
        yield sim
        conn = await asyncpg.connect(tight_gateway["database_url"])
        try:
            await conn.execute("UPDATE nodes SET status = 'dead' WHERE name = 'edge-slow-1'")
        finally:
            await conn.close()


async def _sim_requests(sim) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/sim/stats") as response:
        return (await response.json())["requests_total"]


async def test_a_stream_that_keeps_sending_outlives_every_bound(tight_gateway, slow_model):
    """16 tokens at 4/s: 4 s in all, past the 2 s request, idle and node-silence bounds, never silent 2 s."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{tight_gateway['gateway_url']}/chat/completions", headers=_auth(tight_gateway),
            json={"model": "edge-slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 16,
                  "stream": True}) as response:
        body = await response.read()
    assert response.status == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert body.count(b'"delta":{"content"') == 16


async def test_a_node_silent_too_long_is_a_json_504_and_never_retried(tight_gateway, slow_model):
    before = await _sim_requests(slow_model)
    async with aiohttp.ClientSession() as http, http.post(
            f"{tight_gateway['gateway_url']}/chat/completions", headers=_auth(tight_gateway),
            json={"model": "edge-slow", "messages": [{"role": "user", "content": "x"}],
                  "max_tokens": 16}) as response:  # not streamed: 4 s of silence, then the whole answer
        payload = await response.json(content_type=None)
    assert response.status == 504 and response.content_type == "application/json"
    assert payload["error"]["code"] == "timeout"
    assert await _sim_requests(slow_model) == before + 1  # a timed-out generation is not run again elsewhere


# --- abuse (tight_gateway: 10 failures at once, 0.5 per second after) -------------------------------------

def test_bad_key_spam_is_throttled_per_address_and_working_keys_are_not(tight_gateway):
    demo = send(tight_gateway, request("GET", "/v1/models", _auth(tight_gateway)))
    assert demo.status == 200  # the demo key authenticated from this address: it has a budget of its own
    statuses = []
    for i in range(30):
        # x-forwarded-for is the client's own writing here (no trusted hops): it must not buy a new budget
        reply = send(tight_gateway, request("GET", "/v1/models", {"authorization": f"Bearer clsk_live_{i:032d}",
                                                                 "x-forwarded-for": f"203.0.113.{i}"}))
        statuses.append(reply.status)
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) <= {401, 429} and statuses[-1] == 429
    throttled = send(tight_gateway, request("GET", "/v1/models", {"authorization": "Bearer nope"}))
    assert throttled.status == 429 and throttled.openai_error()["code"] == "too_many_failed_requests"
    retry_after = int(throttled.header("retry-after"))
    assert send(tight_gateway, request("GET", "/v1/models", _auth(tight_gateway))).status == 200
    time.sleep(retry_after)
    assert send(tight_gateway, request("GET", "/v1/models", {"authorization": "Bearer nope"})).status == 401


def test_every_local_reply_body_is_openai_json_and_ours_are_left_alone():
    from crosslogic.contract import TUNNELLED_5XX
    from crosslogic.xds.local_replies import OUR_OWN_BODIES, local_reply_config

    everything = local_reply_config(100, 60, 1 << 20)["mappers"]
    # First, the HTTP authz transport's tunnelled 5xx: their status back, nothing else touched (our body).
    tunnels, mappers = everything[:len(TUNNELLED_5XX)], everything[len(TUNNELLED_5XX):]
    assert all(set(m) == {"filter", "status_code"} for m in tunnels)
    assert sorted(m["status_code"] for m in tunnels) == sorted(TUNNELLED_5XX)
    guard = mappers[0]
    assert set(guard) == {"filter"} and all(d in json.dumps(guard["filter"]) for d in OUR_OWN_BODIES)
    for mapper in mappers[2:]:
        error = json.loads(mapper["body"]["inline_string"])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"]
        assert mapper["body_format_override"]["content_type"] == "application/json"
        status = mapper.get("status_code")
        assert status is None or 400 <= status < 600
        assert error["type"] == ("server_error" if status is not None and status >= 500 else error["type"])
    assert all(m.get("status_code", 400) < 500 or m["status_code"] in (503, 504) for m in mappers)
