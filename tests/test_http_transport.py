"""The HTTP ext_authz transport through real Envoy 1.40: the filter xDS renders (xds/resources.py), the server
(extauthz/http_transport.py) and a stub decision, so each verdict's translation is seen from both ends: what the
node gets, what the client gets, what the usage log records.

The gateway suites run every gateway, limits, billing and scheduler test on both transports (tests/conftest.py);
this one pins down the transport's own promises: client headers removed by name, x-clp-* set, metadata as the
same keys with string values (read back by accounting exactly as over gRPC), a 5xx answered with our JSON (Envoy
would substitute its own 503), rate-limit headers on success and refusal, HEAD answered without a body on a
reused connection, a client's own copy of the peer header overwritten.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from google.protobuf import json_format

from crosslogic import contract, errors
from crosslogic.accounting.usage import record_from_fields
from crosslogic.extauthz.check import Denied
from crosslogic.extauthz.decision import FORWARDED_HEADERS, Allowed
from crosslogic.extauthz.http_transport import authz_http_server
from crosslogic.extauthz.http_wire import Limits
from crosslogic.runtime.envoy import envoy_binary
from crosslogic.runtime.processes import free_port, port_open, wait_until
from crosslogic.xds.model import GatewaySettings
from crosslogic.xds.resources import build_listener
from tests import raw_http

META = {contract.AuthzMeta.ORG_ID: "org-1", contract.AuthzMeta.ENV_ID: "env-1", contract.AuthzMeta.KEY_ID: "key-1",
        contract.AuthzMeta.MODEL: "m", contract.AuthzMeta.REGION: "r", contract.AuthzMeta.ENDPOINT: "chat.completions",
        contract.AuthzMeta.STREAMED: True, contract.AuthzMeta.MAX_TOKENS: 5, contract.AuthzMeta.RESERVE: "12"}


class ByPath:
    """The verdict is chosen by the path's last segment; records the peer each check was asked for."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    async def check(self, peer, method, path, headers, body):
        self.peers.append(peer)
        verdict = path.rsplit("/", 1)[-1]
        if verdict == "allow":
            out = {contract.Header.ORG.value: "org-1", contract.Header.ROUTE.value: "r/m"}
            remove = tuple(h for h in headers if h not in out and h not in FORWARDED_HEADERS)  # as decision.py
            return Allowed(headers=out, remove=remove,
                           metadata=META, response_headers={"x-ratelimit-limit-requests": "60"})
        if verdict == "busy":
            return Denied(errors.server_busy(2), {"retry-after": "2", "x-ratelimit-remaining-tokens": "0"}, META)
        if verdict == "down":
            return Denied(errors.service_unavailable(), {}, META)
        if verdict == "bug":
            return Denied(errors.internal_error())
        return Denied(errors.invalid_api_key())


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"headers": dict(request.headers), "body": (await request.read()).decode()})


def _bootstrap(tmp: Path, listen: int, authz: int, node: int, admin: int) -> dict:
    settings = GatewaySettings(listen_port=listen, usage_log_path=str(tmp / "usage.jsonl"), authz_transport="http")
    listener = json_format.MessageToDict(build_listener(settings))
    hcm = listener["filterChains"][0]["filters"][0]["typedConfig"]
    del hcm["rds"]
    hcm["routeConfig"] = {"virtualHosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "node"}}]}]}
    hcm["accessLog"] = [log for log in hcm["accessLog"] if "file" in log["name"]]  # no accounting service here

    def cluster(name: str, port: int) -> dict:
        return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}]}}

    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [listener],
                                 "clusters": [cluster(contract.AUTHZ_CLUSTER, authz),
                                              cluster(contract.RELEASE_CLUSTER, authz), cluster("node", node)]}}


@pytest.fixture(scope="module")
async def envoy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http-authz")
    checker = ByPath()
    node = web.AppRunner(_app())
    await node.setup()
    node_port, listen, admin = free_port(), free_port(), free_port()
    await web.TCPSite(node, "127.0.0.1", node_port).start()
    async with authz_http_server("127.0.0.1:0", checker, None, Limits()) as authz_port:
        config = tmp / "envoy.json"
        config.write_text(json.dumps(_bootstrap(tmp, listen, authz_port, node_port, admin)))
        proc = _spawn_envoy(config, tmp / "envoy.log")
        try:
            await asyncio.to_thread(wait_until, lambda: port_open("127.0.0.1", listen), 30, "envoy", proc)
            yield {"gateway_base": f"http://127.0.0.1:{listen}", "checker": checker, "log": tmp / "usage.jsonl"}
        finally:
            proc.terminate()
            proc.wait(10)
    await node.cleanup()


def _spawn_envoy(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([str(envoy_binary()), "-c", str(config), "--log-level", "error", "--base-id",
                                 str(free_port()), "--concurrency", "1", "--file-flush-interval-msec", "50"],
                                stdout=out, stderr=subprocess.STDOUT)


def _app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def _send(envoy: dict, request: bytes) -> raw_http.RawResponse:
    """raw_http in a thread: the ext_authz server under test runs on this event loop."""
    return await asyncio.to_thread(raw_http.send, envoy, request)


def _logged(path: Path, request_id: str) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines() if path.exists() else []:
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                return entry
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never reached the usage log")


async def test_an_allow_sets_and_removes_headers_and_logs_the_metadata_accounting_reads(envoy):
    async with aiohttp.ClientSession() as http:
        async with http.post(envoy["gateway_base"] + "/v1/allow", data=b'{"x": 1}', headers={
                "authorization": "Bearer k", "x-junk": "j", contract.Header.ORG.value: "spoofed",
                contract.CLIENT_ADDRESS_HEADER: "203.0.113.9"}) as reply:
            assert reply.status == 200 and reply.headers["x-ratelimit-limit-requests"] == "60"
            seen = (await reply.json())["headers"]
            request_id = reply.headers["x-request-id"]
    seen = {k.lower(): v for k, v in seen.items()}
    assert seen[contract.Header.ORG] == "org-1" and seen[contract.Header.ROUTE] == "r/m"
    for gone in ("authorization", "x-junk", contract.CLIENT_ADDRESS_HEADER, *contract.METADATA_HEADERS):
        assert gone not in seen, gone
    assert envoy["checker"].peers[-1] == "127.0.0.1"  # Envoy's value, not the client's 203.0.113.9
    entry = await asyncio.to_thread(_logged, envoy["log"], request_id)
    assert {k: entry["authz"][k] for k in META} == {k: contract.metadata_header_value(v) for k, v in META.items()}
    record = record_from_fields(request_id, datetime.now(UTC), entry["authz"], {}, 200, 1, None)
    assert (record.org_id, record.model, record.streamed) == ("org-1", "m", True)  # as the gRPC ALS gives it


@pytest.mark.parametrize(("path", "status", "code", "headers"), [
    ("/v1/nokey", 401, "invalid_api_key", {}),
    ("/v1/busy", 429, "server_busy", {"retry-after": "2", "x-ratelimit-remaining-tokens": "0"}),
    ("/v1/down", 503, "service_unavailable", {}),
    ("/v1/bug", 500, "internal_error", {}),
])
async def test_refusals_reach_the_client_as_ours_5xx_included(envoy, path, status, code, headers):
    reply = await _send(envoy, raw_http.request("POST", path, {"content-type": "application/json"}, b"{}"))
    assert reply.status == status and reply.openai_error()["code"] == code
    assert all(reply.header(k) == v for k, v in headers.items())
    assert not any(reply.header(k) for k in contract.METADATA_HEADERS)
    if status in (429, 503):  # limiter refusals carry the request's metadata into the log
        logged = await asyncio.to_thread(_logged, envoy["log"], reply.header("x-request-id"))
        assert logged["authz"]["org_id"] == "org-1"


async def test_head_refusals_keep_the_authz_connection_in_frame(envoy):
    for _ in range(3):  # Envoy reuses its connection to ext_authz: a body after a HEAD answer would desync it
        assert (await _send(envoy, raw_http.request("HEAD", "/v1/nokey", {}))).status == 401
        assert (await _send(envoy, raw_http.request("GET", "/v1/busy", {}))).status == 429


async def test_a_chunked_client_body_reaches_ext_authz_with_a_content_length(envoy):
    reply = await _send(envoy, b"POST /v1/allow HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n"
                                 b"4\r\nabcd\r\n0\r\n\r\n")
    assert reply.status == 200 and json.loads(reply.body)["body"] == "abcd"
