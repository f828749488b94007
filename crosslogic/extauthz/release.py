"""`POST /release`: frees a finished request's concurrency leases the moment its response ends.

Settlement frees them too, but only once the access log reached the accounting service (~100 ms later): a
client sending back-to-back requests at its concurrency limit was refused with nothing in flight. Envoy's Lua
filter (`envoy/lua/usage.lua`) calls this endpoint for requests whose admission took a lease (ext_authz's
metadata `lease`), while it still holds the response's last bytes, so the client cannot send its next
request before the slot is free. Tokens are not touched: settlement still refunds or debits them exactly
once. Idempotent; a failed call only means the lease is freed at settlement, as before.

Body: `{"request_id", "org_id", "env_id", "key_id", "region"}` (JSON strings, from ext_authz's metadata).
Answers 200 `{"released": n}`, 400 for a malformed body, 503 when Valkey cannot be reached.

Kept apart from the gRPC servicer so it can move when ext_authz's transport becomes HTTP (issue 10).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiohttp import web

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


def _json(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


def release_app(limiter: Limiter) -> web.Application:
    async def release(request: web.Request) -> web.Response:
        try:
            what = parse_release(await request.read())
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        try:
            freed = await release_leases(limiter, what.org_id, what.env_id, what.key_id, what.region,
                                         what.request_id)
        except (OSError, aioredis.RedisError) as exc:
            log.warning("cannot release the leases of %s yet (%s): settlement will", what.request_id, exc)
            return _json({"error": "limiter unavailable"}, 503)
        return _json({"released": freed})

    app = web.Application()
    app.router.add_post(RELEASE_PATH, release)
    return app


@asynccontextmanager
async def release_server(listen: str, limiter: Limiter) -> AsyncIterator[int]:
    """Serves `POST /release` on `listen` (host:port; port 0 = any) until the block ends; yields the port."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(release_app(limiter), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host or "127.0.0.1", int(port))
        await site.start()
        bound = runner.addresses[0][1]
        log.info("lease release listening on %s:%d", host or "127.0.0.1", bound)
        yield bound
    finally:
        await runner.cleanup()
