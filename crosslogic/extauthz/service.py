"""Envoy's envoy.service.auth.v3.Authorization protocol <-> Authorizer decisions."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from crosslogic import errors
from crosslogic.extauthz.abuse import FailureBudget
from crosslogic.extauthz.billcap import BillCapGuard
from crosslogic.extauthz.catalog import ModelCatalogue
from crosslogic.extauthz.decision import Allowed, Authorizer, Refused
from crosslogic.extauthz.release import release_server
from crosslogic.extauthz.tenants import TenantCache, follow_changes
from crosslogic.extauthz.throttle import ThrottledAuthorization
from crosslogic.ratelimit.engine import Limiter, limiter_from_settings
from crosslogic.ratelimit.gate import AdmissionGate
from crosslogic.ratelimit.money import MoneyLimiter
from crosslogic.ratelimit.quota import QuotaCounters
from crosslogic.ratelimit.resp import ScriptClient
from crosslogic.runtime.grpc_server import grpc_server
from crosslogic.runtime.metrics_server import metrics_server
from crosslogic.settings import Settings
from crosslogic.store.db import POSTGRES_UNAVAILABLE, open_pool

log = logging.getLogger("crosslogic.extauthz")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def allowed_response(allowed: Allowed) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
    response.ok_response.headers.extend(_header(k, v) for k, v in allowed.headers.items())
    response.ok_response.headers_to_remove.extend(allowed.remove)
    response.ok_response.response_headers_to_add.extend(_header(k, v) for k, v in allowed.response_headers.items())
    response.dynamic_metadata.update(allowed.metadata)
    return response


def denied_response(error: errors.ClientError,
                    headers: dict[str, str] | None = None) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED))
    denied = response.denied_response
    denied.status.code = error.status
    denied.body = error.body().decode()
    denied.headers.extend(_header(k, v) for k, v in {"content-type": "application/json", **(headers or {})}.items())
    return response


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def Check(self, request, context):  # noqa: N802 (gRPC name)
        http = request.attributes.request.http
        try:
            allowed = await self.authorizer.decide(http.method, http.path, dict(http.headers), http.raw_body)
        except errors.ClientError as error:
            return denied_response(error)
        except Refused as refused:
            response = denied_response(refused.error, refused.headers)
            response.dynamic_metadata.update(refused.metadata)
            return response
        except (*POSTGRES_UNAVAILABLE, aioredis.RedisError) as exc:
            log.warning("authorisation backend unavailable: %s", exc)
            return denied_response(errors.service_unavailable())
        except Exception as exc:  # noqa: BLE001 - the last resort: Envoy must always get an answer
            return denied_response(_unexpected(exc, http.method, http.path))
        try:
            return allowed_response(allowed)
        except Exception as exc:  # noqa: BLE001 - e.g. a value protobuf cannot carry
            return denied_response(_unexpected(exc, http.method, http.path))


def _unexpected(exc: BaseException, method: str, path: str) -> errors.ClientError:
    """A bug, not a client mistake: what the client's input could cause is answered as a 400 inside the decision
    (decision._validated), so what reaches here is our fault, answered as OpenAI's 500 and logged as one line
    naming where it happened (no traceback in the log, nothing internal in the reply)."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else "?"
    log.error("unexpected error deciding %.10s %.100s (%s: %.200s at %s); answered 500", method, path,
              type(exc).__name__, exc, place)
    return errors.internal_error()


@dataclass(frozen=True)
class AuthzParts:
    authorizer: Authorizer
    limiter: Limiter
    admits: bool  # the reservation is made in the decision (admission "authz")


@asynccontextmanager
async def authorizer_from_settings(settings: Settings) -> AsyncIterator[AuthzParts]:
    """The decision with its real parts (one Postgres pool, the per-key tenant views and their one change feed,
    the catalogue, the limiter on a lean script client, the bill cap), torn down in order on exit."""
    redis = aioredis.from_url(settings.require_redis(), socket_connect_timeout=0.5, socket_timeout=0.5)
    scripts = ScriptClient(settings.require_redis(), connect_timeout=0.5, timeout=0.5)
    try:
        async with open_pool(settings.require_database(), min_size=2, max_size=16) as pool:
            views = TenantCache(pool, ttl_s=settings.limits_cache_ttl_s)
            catalogue = ModelCatalogue(pool)
            limiter = limiter_from_settings(redis, settings, scripts)
            admits = settings.admission == "authz"
            caps = BillCapGuard(pool, MoneyLimiter(redis, settings.reservation_ttl_ms))
            authorizer = Authorizer(views, catalogue, settings.require_key_secret(), settings.default_region,
                                    QuotaCounters(redis), caps, AdmissionGate(limiter) if admits else None)
            feed = asyncio.create_task(follow_changes(settings.require_database(), views, catalogue.mark_stale,
                                                      caps.prices_changed))
            try:
                yield AuthzParts(authorizer, limiter, admits)
            finally:
                feed.cancel()
                await asyncio.gather(feed, return_exceptions=True)
                await views.aclose()
    finally:
        await scripts.aclose()
        await redis.aclose()


async def serve_authz(settings: Settings, listen: str, release_listen: str | None = None) -> None:
    """`settings.admission == "authz"` (default): the rate-limit reservation is made in Check too, and
    `release_listen` (host:port) serves `POST /release` for Envoy's Lua filter (release.py)."""
    async with authorizer_from_settings(settings) as parts:
        budget = FailureBudget(settings.abuse_failure_burst, settings.abuse_failure_refill_per_s)
        servicer = ThrottledAuthorization(AuthorizationServicer(parts.authorizer), budget, denied_response,
                                          settings.xff_trusted_hops)
        with metrics_server(settings.authz_metrics_port, "ext_authz"):  # admission metrics (ratelimit/metrics.py)
            async with AsyncExitStack() as stack:
                if release_listen and parts.admits:
                    await stack.enter_async_context(release_server(release_listen, parts.limiter))
                server = await stack.enter_async_context(grpc_server(
                    listen, lambda s: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, s),
                    "ext_authz"))
                await server.wait_for_termination()
