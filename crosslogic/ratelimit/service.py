"""Envoy's envoy.service.ratelimit.v3 protocol <-> limiter decisions. No limit maths here.

Envoy sends one descriptor per request (built in xds/resources.py from ext_authz's dynamic metadata
and Envoy's own x-request-id): org_id, env_id, key_id, reserve (prompt estimate + max_tokens) and
request_id (+ region). One EVALSHA decides all org-scoped layers (a second one the platform layers,
when they limit anything); Postgres is only read on a limit-cache miss.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from crosslogic.contract import DESCRIPTOR_REQUEST_ID, REQUIRED_DESCRIPTOR_KEYS, AuthzMeta
from crosslogic.ratelimit.connect import redis_client
from crosslogic.ratelimit.engine import Decision, Limiter, limiter_from_settings
from crosslogic.ratelimit.gate import AdmissionGate, LimiterUnavailable
from crosslogic.ratelimit.protocol import ratelimit_headers, refusal, refusal_headers
from crosslogic.ratelimit.store import LimitStore, follow_limit_changes
from crosslogic.runtime import internal_tls
from crosslogic.runtime.grpc_server import grpc_server
from crosslogic.runtime.ops_http import ops_server
from crosslogic.runtime.readiness import Readiness, postgres_check, redis_check
from crosslogic.settings import Settings
from crosslogic.store.db import open_pool

__all__ = ["LimiterUnavailable", "RateLimitServicer", "response_for", "serve_ratelimit"]
log = logging.getLogger("crosslogic.ratelimit")
DOMAIN = "crosslogic"
_OK = rls_pb2.RateLimitResponse.OK
_OVER = rls_pb2.RateLimitResponse.OVER_LIMIT


def _entries(request: rls_pb2.RateLimitRequest) -> dict[str, str] | None:
    for descriptor in request.descriptors:
        entries = {e.key: e.value for e in descriptor.entries}
        if all(k in entries for k in REQUIRED_DESCRIPTOR_KEYS):
            return entries
    return None


def _headers(values: dict[str, str]) -> list[base_pb2.HeaderValue]:
    return [base_pb2.HeaderValue(key=k, value=v) for k, v in values.items()]


def response_for(decision: Decision) -> rls_pb2.RateLimitResponse:
    if decision.admitted:
        return rls_pb2.RateLimitResponse(overall_code=_OK,
                                         response_headers_to_add=_headers(ratelimit_headers(decision)))
    return rls_pb2.RateLimitResponse(overall_code=_OVER, raw_body=refusal(decision).body(),
                                     response_headers_to_add=_headers(refusal_headers(decision)))


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limiter: Limiter, store: LimitStore) -> None:
        self.gate = AdmissionGate(limiter, store)

    async def decide(self, entries: dict[str, str]) -> Decision:
        return await self.gate.decide(entries[AuthzMeta.ORG_ID], entries[AuthzMeta.ENV_ID], entries[AuthzMeta.KEY_ID],
                                      entries.get(AuthzMeta.REGION, ""), entries[DESCRIPTOR_REQUEST_ID],
                                      int(entries[AuthzMeta.RESERVE]))

    async def ShouldRateLimit(self, request, context):  # noqa: N802 (gRPC name)
        entries = _entries(request)
        if entries is None:
            return rls_pb2.RateLimitResponse(overall_code=_OK)
        try:
            return response_for(await self.decide(entries))
        except LimiterUnavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "limiter unavailable")


async def serve_ratelimit(settings: Settings, listen: str) -> None:
    redis = redis_client(settings.require_redis(), settings.redis_cluster, connect_timeout=0.5, timeout=0.5)
    async with open_pool(settings.require_database(), min_size=1, max_size=8) as pool:
        store = LimitStore(pool, ttl_s=settings.limits_cache_ttl_s)
        limiter = limiter_from_settings(redis, settings)
        feed = asyncio.create_task(follow_limit_changes(settings.database_url, store.clear))
        servicer = RateLimitServicer(limiter, store)
        readiness = Readiness().add("postgres", postgres_check(pool)).add("valkey", redis_check(redis))
        try:
            async with ops_server(settings.ratelimit_metrics_port, "rate-limit service", readiness,
                                  settings.metrics_host):
                async with grpc_server(listen, lambda s: rls_pb2_grpc.add_RateLimitServiceServicer_to_server(
                        servicer, s), "rate-limit service", readiness=readiness,
                        services=["envoy.service.ratelimit.v3.RateLimitService"],
                        credentials=internal_tls.grpc_credentials(
                            internal_tls.service_identity(settings.internal_tls_dir, "ratelimit"))) as server:
                    await server.wait_for_termination()
        finally:
            feed.cancel()
            await redis.aclose()
