"""`POST /release`: frees a finished request's concurrency leases the moment its response ends.

Settlement frees them too, but only once the access log reached the accounting service (~100 ms later): a
client sending back-to-back requests at its concurrency limit was refused with nothing in flight. Envoy's Lua
filter (`envoy_assets/lua/usage.lua`) calls this endpoint for requests whose admission took a lease (ext_authz's
metadata `lease`), while it still holds the response's last bytes, so the client cannot send its next
request before the slot is free. Tokens are not touched: settlement still refunds or debits them exactly
once. Idempotent; a failed call only means the lease is freed at settlement, as before.

Body: `{"request_id", "org_id", "env_id", "key_id", "region"}` (JSON strings, from ext_authz's metadata).
Answers 200 `{"released": n}`, 400 for a malformed body, 503 when Valkey cannot be reached. HTTP/1.1 with
content-length bodies and keep-alive, what Envoy's async client sends.

Kept apart from the gRPC servicer so it can move when ext_authz's transport becomes HTTP (issue 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

from crosslogic.ratelimit.admission import release_leases
from crosslogic.ratelimit.engine import Limiter

log = logging.getLogger("crosslogic.extauthz")
RELEASE_PATH = "/release"
_FIELDS = ("request_id", "org_id", "env_id", "key_id", "region")


@dataclass(frozen=True)
class LeaseRelease:
    request_id: str
    org_id: str
    env_id: str
    key_id: str
    region: str


def parse_release(body: bytes) -> LeaseRelease:
    """Raises ValueError unless the body is a JSON object with every field a non-empty string."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the body is not a JSON object")
    values = [data.get(name) for name in _FIELDS]
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"every one of {', '.join(_FIELDS)} must be a non-empty string")
    return LeaseRelease(*values)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required", 503: "Service Unavailable"}
MAX_HEAD_BYTES = 16384
MAX_BODY_BYTES = 4096  # a release body is ~200 bytes


def _response(status: int, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n").encode() + payload


class _LengthRequired(ValueError):
    """A chunked body: Envoy sends content-length; anything else is refused with 411."""


def _request_head(head: bytes) -> tuple[str, str, int]:
    """(method, path, content length) of an HTTP/1.1 request head; ValueError if it cannot be served."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    length = 0
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            raise _LengthRequired("chunked bodies are not accepted")
    if not 0 <= length <= MAX_BODY_BYTES:
        raise ValueError(f"the body must be at most {MAX_BODY_BYTES} bytes")
    return method, path, length


class ReleaseEndpoint:
    """The endpoint on raw asyncio streams: one small POST per request served, so no web framework (measured,
    same process, same Valkey: 0.25-0.30 ms CPU per release against 0.35-0.39 ms through an aiohttp app; most
    of what is left is the Valkey round trip)."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.connections: set[asyncio.StreamWriter] = set()  # closed on shutdown: Envoy keeps them alive

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if (method, path.split("?", 1)[0]) != ("POST", RELEASE_PATH):
            return 404, {"error": f"only POST {RELEASE_PATH} is served here"}
        try:
            what = parse_release(body)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        try:
            freed = await release_leases(self.limiter, what.org_id, what.env_id, what.key_id, what.region,
                                         what.request_id)
        except (OSError, aioredis.RedisError) as exc:
            log.warning("cannot release the leases of %s yet (%s): settlement will", what.request_id, exc)
            return 503, {"error": "limiter unavailable"}
        return 200, {"released": freed}

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests one after another on a keep-alive connection (Envoy's pool never pipelines)."""
        self.connections.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                try:
                    method, path, length = _request_head(head)
                except ValueError as exc:
                    writer.write(_response(411 if isinstance(exc, _LengthRequired) else 400, {"error": str(exc)}))
                    break
                status, answer = await self.answer(method, path, await reader.readexactly(length))
                writer.write(_response(status, answer))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the peer went away, or sent a head over MAX_HEAD_BYTES
        finally:
            self.connections.discard(writer)
            writer.close()


@asynccontextmanager
async def release_server(listen: str, limiter: Limiter) -> AsyncIterator[int]:
    """Serves `POST /release` on `listen` (host:port; port 0 = any) until the block ends; yields the port."""
    host, _, port = listen.rpartition(":")
    endpoint = ReleaseEndpoint(limiter)
    server = await asyncio.start_server(endpoint.serve_connection, host or "127.0.0.1", int(port),
                                        limit=MAX_HEAD_BYTES)
    bound = server.sockets[0].getsockname()[1]
    log.info("lease release listening on %s:%d", host or "127.0.0.1", bound)
    try:
        yield bound
    finally:
        server.close()
        for writer in list(endpoint.connections):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)
