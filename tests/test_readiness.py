"""Readiness really checks the dependencies: /readyz and grpc.health.v1 turn "not ready" when Valkey or Postgres
stop answering, and ready again when they answer (real Postgres, a real Valkey that is stopped and started)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crosslogic.runtime.grpc_server import grpc_server
from crosslogic.runtime.ops_http import ops_server
from crosslogic.runtime.processes import free_port
from crosslogic.runtime.readiness import Readiness, postgres_check, redis_check
from crosslogic.store.db import open_pool

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _ready(port: int) -> tuple[int, dict]:
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz")


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


async def test_readyz_and_grpc_health_follow_valkey_going_away_and_coming_back(database_url, tmp_path):
    from crosslogic.runtime.valkey import EmbeddedValkey

    valkey = EmbeddedValkey(tmp_path / "valkey").start()
    redis = aioredis.from_url(valkey.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    port, listen = free_port(), f"127.0.0.1:{free_port()}"
    try:
        async with open_pool(database_url) as pool:
            readiness = Readiness().add("postgres", postgres_check(pool)).add("valkey", redis_check(redis))
            async with ops_server(port, "test", readiness), grpc_server(listen, lambda s: None, "test",
                                                                          readiness=readiness):
                status, body = await _ready(port)
                assert status == 200 and body["checks"]["valkey"] == {"ok": True, "detail": "PONG"}
                assert await _health(listen) == SERVING

                valkey.stop()
                status, body = await _ready(port)
                assert status == 503 and body["status"] == "not ready"
                assert body["checks"]["postgres"]["ok"] and not body["checks"]["valkey"]["ok"]
                assert await _health(listen) == NOT_SERVING
                assert (await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz"))[0] == 200  # alive

                valkey.start()
                status, body = await _ready(port)
                assert status == 200, body
                assert await _health(listen) == SERVING
    finally:
        await redis.aclose()
        valkey.stop()
