"""ext_authz's POST /release (crosslogic/extauthz/release.py) over real HTTP, on a real Valkey: served by the
HTTP transport's server (extauthz/http_transport.py), beside the checks."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest
import redis.asyncio as aioredis

from crosslogic.extauthz.decision import Allowed
from crosslogic.extauthz.http_transport import authz_http_server
from crosslogic.extauthz.http_wire import Limits
from crosslogic.extauthz.release import LeaseReleaser, parse_release
from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.limits import LayerLimits, TenantLimits


@pytest.fixture
async def limiter(valkey_url):
    client = aioredis.from_url(valkey_url)
    yield Limiter(client)
    await client.aclose()


class _AllowAll:
    async def check(self, peer, method, path, headers, body):
        return Allowed(headers={}, remove=())


def release_server(listen: str, limiter: Limiter):
    return authz_http_server(listen, _AllowAll(), LeaseReleaser(limiter), Limits())


def _body(request_id: str, org: str, env: str, key: str) -> dict:
    return {"request_id": request_id, "org_id": org, "env_id": env, "key_id": key, "region": "ap-south"}


async def test_release_frees_the_lease_once_over_keep_alive_http(limiter):
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(concurrency=1))
    request = uuid.uuid4().hex
    assert (await limiter.reserve(org, env, key, request, 10, limits)).leases == 1
    async with release_server("127.0.0.1:0", limiter) as port, aiohttp.ClientSession() as http:
        answers = []
        for _ in range(2):  # the same connection, twice: idempotent
            async with http.post(f"http://127.0.0.1:{port}/release", json=_body(request, org, env, key)) as r:
                answers.append((r.status, r.headers["content-type"], await r.json()))
        assert answers == [(200, "application/json", {"released": 1}), (200, "application/json", {"released": 0})]
        assert (await limiter.reserve(org, env, key, uuid.uuid4().hex, 10, limits)).admitted
        assert await limiter.settle(org, env, key, request, 7)  # the tokens were left to settlement
        assert await limiter.charged(org, "key", key) == 7


async def test_release_refuses_what_it_cannot_serve(limiter):
    async with release_server("127.0.0.1:0", limiter) as port, aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/release", data=b"{") as r:
            assert r.status == 400 and "JSON" in (await r.json())["error"]
        async with http.get(f"http://127.0.0.1:{port}/other") as r:
            assert r.status == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /release HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 411 ")  # answered, then closed
        writer.close()


def test_release_bodies_must_name_the_whole_reservation():
    assert parse_release(json.dumps(_body("r", "o", "e", "k")).encode()).key_id == "k"
    for bad in (b"[]", b'{"request_id": "r"}', json.dumps({**_body("r", "o", "e", "k"), "org_id": 5}).encode()):
        with pytest.raises(ValueError):
            parse_release(bad)
