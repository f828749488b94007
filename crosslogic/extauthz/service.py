"""ext_authz, wired: the decision's parts, the check around it, and the transport Envoy reaches it by.

`settings.authz_transport`: "http" (default; http_transport.py, Envoy's `http_service`) or "grpc"
(grpc_transport.py, the standard envoy.service.auth.v3.Authorization service). The HTTP server also serves
`POST /release` for the Lua filter (release.py): on the check port with the HTTP transport, on
`release_listen` with gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2_grpc

from crosslogic.extauthz.abuse import FailureBudget
from crosslogic.extauthz.billcap import BillCapGuard
from crosslogic.extauthz.catalog import ModelCatalogue
from crosslogic.extauthz.check import GuardedAuthorizer
from crosslogic.extauthz.decision import Authorizer
from crosslogic.extauthz.grpc_transport import AuthorizationServicer
from crosslogic.extauthz.http_transport import authz_http_server
from crosslogic.extauthz.http_wire import Limits
from crosslogic.extauthz.license_guard import LicenseGuard
from crosslogic.extauthz.observe import ObservedChecker
from crosslogic.extauthz.release import LeaseReleaser
from crosslogic.extauthz.tenants import TenantCache, follow_changes
from crosslogic.extauthz.throttle import ThrottledChecker
from crosslogic.ratelimit.connect import redis_client, script_client
from crosslogic.ratelimit.engine import Limiter, limiter_from_settings
from crosslogic.ratelimit.gate import AdmissionGate
from crosslogic.ratelimit.money import MoneyLimiter
from crosslogic.ratelimit.quota import QuotaCounters
from crosslogic.runtime import internal_tls
from crosslogic.runtime.grpc_server import grpc_server
from crosslogic.runtime.ops_http import ops_server
from crosslogic.runtime.readiness import Readiness, postgres_check, redis_check
from crosslogic.settings import Settings, SettingsError
from crosslogic.store.db import open_pool
from crosslogic.tracing import tracer_from_settings

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


def http_limits(settings: Settings) -> Limits:
    """The HTTP server's limits, above Envoy's own on the client's request (headers + what Envoy adds, body)."""
    return Limits(max_head_bytes=(settings.max_request_headers_kib + 8) * 1024,
                  max_headers=settings.max_request_headers + 32, max_body_bytes=settings.max_request_bytes)


@dataclass(frozen=True)
class AuthzParts:
    authorizer: Authorizer
    limiter: Limiter
    admits: bool  # the reservation is made in the decision (admission "authz")
    readiness: Readiness  # the decision's own Postgres pool and Valkey client answer


def license_guard(settings: Settings, pool) -> LicenseGuard | None:
    """Flat licences when a licence key is configured; air-gapped mode needs one (there is no other billing)."""
    from crosslogic.settings import SupervisorSettings

    if not settings.license_public_key:
        if SupervisorSettings().airgap:
            raise SettingsError("air-gapped mode needs CROSSLOGIC_LICENSE_PUBLIC_KEY (the licence signing key's "
                                "public half): orgs are billed by licence")
        return None
    return LicenseGuard(pool, Path(settings.license_public_key).read_bytes())


@asynccontextmanager
async def authorizer_from_settings(settings: Settings) -> AsyncIterator[AuthzParts]:
    """The decision with its real parts (one Postgres pool, the per-key tenant views and their one change feed,
    the catalogue, the limiter on a lean script client, the bill cap), torn down in order on exit."""
    redis = redis_client(settings.require_redis(), settings.redis_cluster, connect_timeout=0.5, timeout=0.5,
                         request_path=True)
    scripts = script_client(settings.require_redis(), settings.redis_cluster, connect_timeout=0.5, timeout=0.5,
                            wait_replicas=settings.redis_wait(), wait_timeout_ms=settings.redis_wait_timeout_ms)
    try:
        async with open_pool(settings.require_database(), min_size=2, max_size=16) as pool:
            views = TenantCache(pool, ttl_s=settings.limits_cache_ttl_s)
            catalogue = ModelCatalogue(pool)
            limiter = limiter_from_settings(redis, settings, scripts)
            admits = settings.admission == "authz"
            caps = BillCapGuard(pool, MoneyLimiter(redis, settings.reservation_ttl_ms))
            authorizer = Authorizer(views, catalogue, settings.require_key_secret(), settings.default_region,
                                    QuotaCounters(redis), caps, AdmissionGate(limiter) if admits else None,
                                    license=license_guard(settings, pool))
            feed = asyncio.create_task(follow_changes(settings.require_database(), views, catalogue.mark_stale,
                                                      caps.prices_changed))
            try:
                readiness = Readiness().add("postgres", postgres_check(pool)).add("valkey", redis_check(redis))
                yield AuthzParts(authorizer, limiter, admits, readiness)
            finally:
                feed.cancel()
                await asyncio.gather(feed, return_exceptions=True)
                await views.aclose()
    finally:
        await scripts.aclose()
        await redis.aclose()


async def serve_authz(settings: Settings, listen: str, release_listen: str | None = None,
                      transport: str | None = None) -> None:
    """Checks on `listen` in `transport` (default settings.authz_transport); the HTTP server also on
    `release_listen` when given. `settings.admission == "authz"` (default): the rate-limit reservation is made in
    the check too, and `POST /release` frees leases."""
    transport = transport or settings.authz_transport
    who = internal_tls.service_identity(settings.internal_tls_dir, "authz")  # production: Envoy's client cert only
    async with authorizer_from_settings(settings) as parts:
        budget = FailureBudget(settings.abuse_failure_burst, settings.abuse_failure_refill_per_s)
        tracer = tracer_from_settings(settings.otlp_endpoint, "crosslogic-authz")
        checker = ObservedChecker(ThrottledChecker(GuardedAuthorizer(parts.authorizer), budget,
                                                   settings.xff_trusted_hops), tracer)
        releaser = LeaseReleaser(parts.limiter) if parts.admits else None
        bounds = http_limits(settings)
        try:
            # /metrics: admission (ratelimit/metrics.py) and checks (extauthz/observe.py); /healthz, /readyz
            async with ops_server(settings.authz_metrics_port, "ext_authz", parts.readiness,
                                  settings.metrics_host):
                async with AsyncExitStack() as stack:
                    http_listens = [listen] if transport == "http" else []
                    if release_listen and release_listen not in http_listens:
                        http_listens.append(release_listen)
                    for address in http_listens:
                        await stack.enter_async_context(authz_http_server(address, checker, releaser, bounds,
                                                                          internal_tls.ssl_context_of(who)))
                    if transport == "grpc":
                        servicer = AuthorizationServicer(checker)
                        server = await stack.enter_async_context(grpc_server(
                            listen, lambda s: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, s),
                            "ext_authz", readiness=parts.readiness, services=[AUTHORIZATION_SERVICE],
                            credentials=internal_tls.grpc_credentials(who)))
                        await server.wait_for_termination()
                    else:
                        await asyncio.Event().wait()  # until cancelled (SIGTERM)
        finally:
            tracer.shutdown()
