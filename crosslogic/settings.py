"""All configuration in one place, read from CROSSLOGIC_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CROSSLOGIC_{name}", default)


ADMISSION_MODES = ("authz", "rls")


@dataclass(frozen=True)
class Settings:
    database_url: str = field(default_factory=lambda: _env("DATABASE_URL", ""))
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", ""))
    # Server secret for HMAC-SHA256 of API keys; the database never sees a plaintext key.
    key_secret: str = field(default_factory=lambda: _env("KEY_SECRET", ""))
    # Region used when neither the key, the environment nor the org names one.
    default_region: str = field(default_factory=lambda: _env("DEFAULT_REGION", "ap-south"))
    # Largest request body ext_authz inspects; bigger bodies get 413 from Envoy.
    max_request_bytes: int = field(default_factory=lambda: int(_env("MAX_REQUEST_BYTES", str(1024 * 1024))))
    # Seconds a key/env/org record stays in the shared Redis cache (seed §9.3).
    identity_cache_ttl_s: int = field(default_factory=lambda: int(_env("IDENTITY_CACHE_TTL", "60")))
    # Accounting sink: flush the ledger batch after this many records or seconds.
    ledger_batch_size: int = field(default_factory=lambda: int(_env("LEDGER_BATCH_SIZE", "500")))
    ledger_flush_interval_s: float = field(default_factory=lambda: float(_env("LEDGER_FLUSH_INTERVAL", "0.2")))
    # Envoy's JSON-lines usage log (the durable backstop); xds tells Envoy to write it, accounting replays it.
    usage_log_path: str = field(default_factory=lambda: _env("USAGE_LOG", ""))
    # Rotate the usage log past this size once replayed (needs Envoy's admin URL to reopen it); 0 = never.
    usage_log_rotate_bytes: int = field(default_factory=lambda: int(_env("USAGE_LOG_ROTATE_BYTES", str(64 << 20))))
    envoy_admin_url: str = field(default_factory=lambda: _env("ENVOY_ADMIN_URL", ""))
    # Billing reporter (runs inside the accounting service when a Stripe key is set).
    stripe_api_key: str = field(default_factory=lambda: _env("STRIPE_API_KEY", ""))
    stripe_api_base: str = field(default_factory=lambda: _env("STRIPE_API_BASE", ""))  # "" = api.stripe.com
    billing_interval_s: int = field(default_factory=lambda: int(_env("BILLING_INTERVAL", "60")))
    billing_retry_base_s: float = field(default_factory=lambda: float(_env("BILLING_RETRY_BASE", "60")))
    # How often the accounting service checks bill caps (alerts, auto-suspend).
    guardrail_interval_s: float = field(default_factory=lambda: float(_env("GUARDRAIL_INTERVAL", "5")))
    # Prometheus /metrics of the accounting service; 0 = off.
    accounting_metrics_port: int = field(default_factory=lambda: int(_env("ACCOUNTING_METRICS_PORT", "0")))
    # Prometheus /metrics (admission decisions, limiter latency) of ext_authz and of `serve ratelimit`; 0 = off.
    authz_metrics_port: int = field(default_factory=lambda: int(_env("AUTHZ_METRICS_PORT", "0")))
    ratelimit_metrics_port: int = field(default_factory=lambda: int(_env("RATELIMIT_METRICS_PORT", "0")))
    # Rate limiter: limits cached per key this long (a NOTIFY drops them sooner); reservations that are
    # never settled (lost access-log entries) expire after this long, releasing their leases.
    limits_cache_ttl_s: float = field(default_factory=lambda: float(_env("LIMITS_CACHE_TTL", "10")))
    reservation_ttl_ms: int = field(default_factory=lambda: int(_env("RESERVATION_TTL_MS", str(15 * 60_000))))
    # Concurrency leases of such requests are freed sooner: after the longest request (the route's 600 s
    # upstream timeout) plus a minute.
    lease_ttl_ms: int = field(default_factory=lambda: int(_env("LEASE_TTL_MS", str(11 * 60_000))))
    # Redis Cluster: one limiter script call per scope (each in one hash slot) instead of one per request.
    limiter_split_scopes: bool = field(default_factory=lambda: _env("LIMITER_SPLIT_SCOPES", "0") == "1")
    # Where the rate-limit reservation is made: "authz" = inside the ext_authz Check call (one Python hop
    # per request), "rls" = Envoy's ratelimit filter calling `crosslogic serve ratelimit` (standard protocol).
    admission: str = field(default_factory=lambda: _env("ADMISSION", "authz"))
    # Slow clients (Envoy): seconds from a request's first byte to its last header, and to its last body byte;
    # an unused keep-alive connection is closed after this long; the longest a node may stay silent (before
    # its answer and between stream chunks; a stream that keeps sending is never cut).
    request_headers_timeout_s: float = field(default_factory=lambda: float(_env("REQUEST_HEADERS_TIMEOUT", "10")))
    request_timeout_s: float = field(default_factory=lambda: float(_env("REQUEST_TIMEOUT", "30")))
    connection_idle_timeout_s: float = field(default_factory=lambda: float(_env("CONNECTION_IDLE_TIMEOUT", "60")))
    upstream_idle_timeout_s: float = field(default_factory=lambda: float(_env("UPSTREAM_IDLE_TIMEOUT", "600")))
    # Request header limits (Envoy answers a JSON 431 past them).
    max_request_headers: int = field(default_factory=lambda: int(_env("MAX_REQUEST_HEADERS", "100")))
    max_request_headers_kib: int = field(default_factory=lambda: int(_env("MAX_REQUEST_HEADERS_KB", "60")))
    # x-forwarded-for entries appended by our own proxies in front of Envoy (0: the peer is the client).
    xff_trusted_hops: int = field(default_factory=lambda: int(_env("XFF_TRUSTED_HOPS", "0")))
    # Failed requests (bad key, bad payload) a client address may make at once, refilled per second; past
    # them its requests get 429 before authentication (extauthz/abuse.py). Burst 0 = off.
    abuse_failure_burst: int = field(default_factory=lambda: int(_env("ABUSE_FAILURE_BURST", "500")))
    abuse_failure_refill_per_s: float = field(default_factory=lambda: float(_env("ABUSE_FAILURE_REFILL", "10")))

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise SystemExit(f"CROSSLOGIC_ADMISSION must be one of {', '.join(ADMISSION_MODES)}, "
                             f"not {self.admission!r}")

    def require_database(self) -> str:
        if not self.database_url:
            raise SystemExit("CROSSLOGIC_DATABASE_URL is not set (crosslogic up sets it for its children)")
        return self.database_url

    def require_redis(self) -> str:
        if not self.redis_url:
            raise SystemExit("CROSSLOGIC_REDIS_URL is not set (crosslogic up sets it for its children)")
        return self.redis_url

    def require_key_secret(self) -> bytes:
        if not self.key_secret:
            raise SystemExit("CROSSLOGIC_KEY_SECRET is not set (crosslogic up keeps one in its state dir)")
        return self.key_secret.encode()


@dataclass(frozen=True)
class SchedulerSettings:
    """The node registry and scheduler (xDS process) and the NodeAgent service it serves."""

    heartbeat_timeout_s: float = field(default_factory=lambda: float(_env("HEARTBEAT_TIMEOUT", "15")))
    dead_after_s: float = field(default_factory=lambda: float(_env("NODE_DEAD_AFTER", "60")))
    drain_ttl_s: float = field(default_factory=lambda: float(_env("NODE_DRAIN_TTL", "120")))
    remove_after_s: float = field(default_factory=lambda: float(_env("NODE_REMOVE_AFTER", "3600")))
    # How often liveness and weights are re-evaluated (pushes happen only when something changed).
    tick_s: float = field(default_factory=lambda: float(_env("SCHEDULER_TICK", "1.0")))
    # Told to agents at registration.
    heartbeat_interval_ms: int = field(default_factory=lambda: int(_env("HEARTBEAT_INTERVAL_MS", "5000")))
    metrics_interval_ms: int = field(default_factory=lambda: int(_env("METRICS_INTERVAL_MS", "15000")))
    # Directory with ca.pem, server.pem, server.key (`crosslogic pki init`); empty = plaintext (development).
    pki_dir: str = field(default_factory=lambda: _env("PKI_DIR", ""))
