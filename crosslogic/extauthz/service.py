"""Envoy's envoy.service.auth.v3.Authorization protocol <-> Authorizer decisions."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import grpc
import redis.asyncio as aioredis
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from crosslogic import errors
from crosslogic.extauthz.billcap import BillCaps
from crosslogic.extauthz.catalog import ModelCatalogue
from crosslogic.extauthz.decision import Allowed, Authorizer
from crosslogic.extauthz.identity import IdentityResolver, follow_tenancy_changes
from crosslogic.ratelimit.quota import QuotaGuard
from crosslogic.ratelimit.store import follow_limit_changes
from crosslogic.settings import Settings
from crosslogic.store.db import open_pool

log = logging.getLogger("crosslogic.extauthz")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"  # where Envoy files our dynamic metadata


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def allowed_response(allowed: Allowed) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
    response.ok_response.headers.extend(_header(k, v) for k, v in allowed.headers.items())
    response.ok_response.headers_to_remove.extend(allowed.remove)
    response.dynamic_metadata.update(allowed.metadata)
    return response


def denied_response(error: errors.ClientError) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED))
    denied = response.denied_response
    denied.status.code = error.status
    denied.body = error.body().decode()
    denied.headers.append(_header("content-type", "application/json"))
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
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, aioredis.RedisError) as exc:
            log.warning("authorisation backend unavailable: %s", exc)
            return denied_response(errors.service_unavailable())
        return allowed_response(allowed)


async def serve_authz(settings: Settings, listen: str) -> None:
    redis = aioredis.from_url(settings.require_redis(), socket_connect_timeout=0.5, socket_timeout=0.5)
    async with open_pool(settings.require_database(), min_size=2, max_size=16) as pool:
        resolver = IdentityResolver(pool, redis, redis_ttl_s=settings.identity_cache_ttl_s)
        catalogue = ModelCatalogue(pool)
        quotas = QuotaGuard(pool, redis, ttl_s=settings.limits_cache_ttl_s)
        authorizer = Authorizer(resolver, catalogue, settings.require_key_secret(), settings.default_region, quotas,
                                BillCaps(pool))
        feed = asyncio.create_task(follow_tenancy_changes(settings.database_url, resolver, catalogue.mark_stale))
        quota_feed = asyncio.create_task(follow_limit_changes(settings.database_url, quotas.clear))
        server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(authorizer), server)
        server.add_insecure_port(listen)
        await server.start()
        log.info("ext_authz listening on %s", listen)
        try:
            await server.wait_for_termination()
        finally:
            feed.cancel()
            quota_feed.cancel()
            await server.stop(1)
            await redis.aclose()
