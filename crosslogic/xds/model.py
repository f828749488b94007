"""Domain values the snapshot is built from: node pools and the gateway's own settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from crosslogic.contract import route_key


class EndpointHealth(Enum):
    HEALTHY = "healthy"
    DRAINING = "draining"  # in-flight requests finish, no new ones
    DEGRADED = "degraded"  # used only when the healthy hosts are not enough (latency spike)
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class PoolEndpoint:
    node_id: str
    host: str
    port: int
    weight: int = 100
    health: EndpointHealth = EndpointHealth.HEALTHY
    priority: int = 0  # 0 = the pool's own region; higher = fallback regions


@dataclass(frozen=True)
class Pool:
    """All nodes serving one model in one region: one Envoy cluster."""

    region: str
    model: str
    endpoints: tuple[PoolEndpoint, ...] = ()
    retries: int | None = None  # from the routing policy; None = the gateway default
    lane: str | None = None  # org id of a reserved lane; None = the shared serverless pool
    # Failover safety throttle (seed §26.4): at most this share of requests may use the fallback regions.
    spill_share: float = 1.0
    local_only: bool = False  # the throttle's second cluster: the region's own nodes only

    @property
    def route_key(self) -> str:
        return route_key(self.region, self.model, self.lane)

    @property
    def cluster_name(self) -> str:
        return self.route_key + ("#local" if self.local_only else "")



@dataclass(frozen=True)
class GatewaySettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    max_request_bytes: int = 1024 * 1024
    authz_timeout_ms: int = 2000
    # The longest a node may stay silent: before its answer (queue, or a whole non-streamed generation) and
    # between two chunks of a stream. A stream that keeps sending is never cut.
    upstream_idle_timeout_s: float = 600.0
    retries: int = 2
    als_flush_interval_ms: int = 100
    extra_listeners: tuple[tuple[str, int], ...] = field(default=())
    # Durable usage backstop: Envoy also appends every finished request here as one JSON line, which the
    # accounting service replays into the ledger (crosslogic/accounting/backstop.py). "" = off.
    usage_log_path: str = ""
    # HTTPS on the public listener: certificate chain and key, paths on the Envoy's host ("" = plain HTTP).
    tls_cert_path: str = ""
    tls_key_path: str = ""
    # Rate-limit admission: "authz" = ext_authz reserves in its Check call (no ratelimit filter);
    # "rls" = Envoy's ratelimit filter calls `crosslogic serve ratelimit` (crosslogic.settings.admission).
    admission: str = "authz"
    # How Envoy asks ext_authz: "http" (`http_service`) or "grpc" (`grpc_service`) (crosslogic.settings).
    authz_transport: str = "http"
    # Client bounds (crosslogic.settings, `client_bounds`; resources._client_bounds).
    request_headers_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    connection_idle_timeout_s: float = 60.0
    max_request_headers: int = 100
    max_request_headers_kib: int = 60
    xff_trusted_hops: int = 0
    # OpenTelemetry (settings.otlp_endpoint): Envoy traces to the bootstrap's collector cluster; 0 = off.
    trace_sample_percent: float = 0.0
    # A site gateway's listener (xds/sites.py): ext_authz is told the site's org and refuses every other org's key.
    site_org: str = ""


CLIENT_BOUND_FIELDS = ("request_headers_timeout_s", "request_timeout_s", "connection_idle_timeout_s",
                       "upstream_idle_timeout_s", "max_request_headers", "max_request_headers_kib", "xff_trusted_hops")


def client_bounds(settings: object) -> dict[str, object]:
    """The GatewaySettings fields that crosslogic.settings.Settings carries under the same names."""
    return {name: getattr(settings, name) for name in CLIENT_BOUND_FIELDS}
