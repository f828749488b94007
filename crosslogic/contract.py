"""The wire contract between Envoy and the services: header names, metadata namespaces and keys, rate-limit
descriptor keys, the usage-log format, cluster names, the route key, limit kinds and layers.

The ground floor: it imports nothing of crosslogic, the Envoy configuration is rendered from it (xds/resources.py,
runtime/envoy.py, the Lua filter's constants via `lua_constants()`), and every service that reads or writes one of
these names imports it from here. Changing a value here changes both ends at once.
"""

from __future__ import annotations

from enum import StrEnum

# --- Headers -------------------------------------------------------------------------------------------------------
# Every header ext_authz sets on the upstream request starts with this; the client's own are stripped.
INTERNAL_HEADER_PREFIX = "x-clp-"
REQUEST_ID_HEADER = "x-request-id"  # Envoy's own id (preserve_external_request_id: false): the ledger's key
AUTHORIZATION_HEADER = "authorization"


class Header(StrEnum):
    """Set by ext_authz on the upstream request; Envoy routes on ROUTE, the Lua filter reads USAGE_MODE."""

    ORG = "x-clp-org"
    ENV = "x-clp-env"
    KEY = "x-clp-key"
    MODEL = "x-clp-model"
    REGION = "x-clp-region"
    ROUTE = "x-clp-route"
    USAGE_MODE = "x-clp-usage-mode"


class UsageMode(StrEnum):
    """How the Lua filter treats a response (`x-clp-usage-mode`)."""

    JSON = "json"  # non-streaming: usage from the JSON body
    SSE_STRIP = "sse-strip"  # stream, client did not ask for usage: no usage key on any chunk
    SSE_NULL = "sse-null"  # include_usage: "usage": null on every chunk, then the usage-only chunk
    SSE_KEEP = "sse-keep"  # include_usage + vLLM's continuous_usage_stats: chunks as the node sent them


# --- Dynamic metadata ----------------------------------------------------------------------------------------------
AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"  # where Envoy files ext_authz's dynamic metadata
USAGE_NAMESPACE = "crosslogic.usage"  # written by the Lua filter


class AuthzMeta(StrEnum):
    """Keys of ext_authz's dynamic metadata: the identity the access log (and so the ledger) trusts."""

    ORG_ID = "org_id"
    ENV_ID = "env_id"
    KEY_ID = "key_id"
    MODEL = "model"
    REGION = "region"
    ENDPOINT = "endpoint"
    STREAMED = "streamed"
    MAX_TOKENS = "max_tokens"
    PROMPT_ESTIMATE = "prompt_estimate"
    RESERVE = "reserve"  # tokens reserved, as a string (Envoy's rate-limit metadata action reads strings)
    LEASE = "lease"  # the request id, when admission took a concurrency lease the Lua filter must release early


class UsageMeta(StrEnum):
    """Keys the Lua filter writes in USAGE_NAMESPACE."""

    MODE = "mode"
    PROMPT_TOKENS = "prompt_tokens"
    COMPLETION_TOKENS = "completion_tokens"
    FINISHED = "finished"  # the whole JSON body, or a stream's [DONE], went through


# --- ext_authz over HTTP (`http_service`; extauthz/http_transport.py, xds/resources.py renders the filter) ---------
# Envoy asks at this prefix + the client's path, so no client path can reach POST RELEASE_PATH on the same server.
AUTHZ_CHECK_PREFIX = "/check"
# Added by Envoy to every check request (overwriting a client's own): the connection's peer, what the gRPC
# CheckRequest calls source.address (the failure budget's client, extauthz/throttle.py).
CLIENT_ADDRESS_HEADER = "x-clp-client-address"
# Set by a site gateway's listener (per-identity xDS, xds/sites.py) on every ext_authz check: the org the site
# belongs to; ext_authz refuses any other org's key with 403 (docs/sites.md). Envoy overwrites a client's value.
SITE_ORG_HEADER = "x-clp-site-org"
# A 200 from the authz server names here (comma-separated) the client headers Envoy removes before the node.
HEADERS_TO_REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# Envoy files each authz response header listed in `dynamic_metadata_from_headers` in AUTHZ_NAMESPACE under the
# header's own (lower-case) name, as a string. So the header names are the AuthzMeta keys themselves: the access
# logs, the usage-log filter, the rate-limit descriptors and usage.lua read the same keys from either transport;
# only the value types differ (strings over HTTP: metadata_header_value; accounting/usage.py normalises).
METADATA_HEADERS: tuple[str, ...] = tuple(m.value for m in AuthzMeta)
# What a client may see of the authz server's headers: on a refusal, and on success (rate-limit state).
RATELIMIT_HEADER_PREFIX = "x-ratelimit-"
REFUSAL_CLIENT_HEADERS = ("content-type", "retry-after", "retry-after-ms")
# Envoy takes any 5xx from an HTTP authz server for its own failure (status_on_error, no body, no metadata).
# Ours travel as 450-454 (unassigned codes) and the local-reply mapper gives them back their status
# (xds/local_replies.py), so the client gets our JSON body, headers and metadata exactly as over gRPC.
TUNNELLED_5XX = {500: 450, 502: 452, 503: 453, 504: 454}


def authz_wire_status(status: int) -> int:
    """The status an HTTP authz answer carries for a decision of `status` (any other 5xx travels as a 500)."""
    if status < 500:
        return status
    return TUNNELLED_5XX.get(status, TUNNELLED_5XX[500])


def metadata_header_value(value: object) -> str:
    """A metadata value as the HTTP transport sends it: Envoy stores header values as strings."""
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def metadata_flag(value: object) -> bool:
    """A boolean metadata value read back from either transport (gRPC: a bool; HTTP: "true" / "false")."""
    return value is True or value == "true"


# --- Postgres NOTIFY channels (the migrations' triggers send on them) -------------------------------------------
TENANCY_CHANNEL = "crosslogic_tenancy"  # orgs, environments, api_keys: "table:id"
ROUTING_CHANNEL = "crosslogic_routing"  # nodes, regions, models, routing policy
LIMITS_CHANNEL = "crosslogic_limits"  # any limit column or limit policy
PRICES_CHANNEL = "crosslogic_prices"  # price, region multiplier and org-terms versions

# --- Rate-limit service descriptors (admission "rls") -------------------------------------------------------------
RATELIMIT_DOMAIN = "crosslogic"
DESCRIPTOR_REQUEST_ID = "request_id"
# Descriptor entries Envoy's ratelimit filter builds from ext_authz's metadata, in this order.
DESCRIPTOR_METADATA_KEYS = (AuthzMeta.ORG_ID, AuthzMeta.ENV_ID, AuthzMeta.KEY_ID, AuthzMeta.RESERVE, AuthzMeta.REGION)
REQUIRED_DESCRIPTOR_KEYS = (AuthzMeta.ORG_ID, AuthzMeta.ENV_ID, AuthzMeta.KEY_ID, AuthzMeta.RESERVE,
                            DESCRIPTOR_REQUEST_ID)

# --- Static clusters of the bootstrap (runtime/envoy.py renders them) ---------------------------------------------
XDS_CLUSTER = "crosslogic_xds"
AUTHZ_CLUSTER = "crosslogic_authz"
ACCOUNTING_CLUSTER = "crosslogic_accounting"
API_CLUSTER = "crosslogic_api"
RATELIMIT_CLUSTER = "crosslogic_ratelimit"
RELEASE_CLUSTER = "crosslogic_release"
ENVOY_ADMIN_CLUSTER = "crosslogic_envoy_admin"  # the stats listener's way to Envoy's own admin (loopback only)
OTEL_CLUSTER = "crosslogic_otel"  # the OTLP/gRPC collector Envoy sends its spans to (settings.otlp_endpoint)
GATEWAY_TRACE_SERVICE = "crosslogic-gateway"  # service.name of Envoy's spans
STATS_PATHS = ("/stats/prometheus", "/ready")  # all the stats listener serves of the admin
RELEASE_PATH = "/release"  # ext_authz's lease release endpoint (extauthz/release.py), called by the Lua filter
ACCESS_LOG_NAME = "crosslogic_usage"  # the gRPC access log's log_name


def route_key(region: str, model: str, lane: str | None = None) -> str:
    """The value ext_authz puts in x-clp-route and the name of the pool's cluster."""
    return f"{region}/{model}@{lane}" if lane else f"{region}/{model}"


# --- The durable usage log (Envoy's file access log; accounting/backstop.py parses it) ----------------------------
USAGE_LOG_FORMAT = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "start_time": "%START_TIME(%s.%6f)%",
    "status": "%RESPONSE_CODE%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_HOST%",
    "authz": f"%DYNAMIC_METADATA({AUTHZ_NAMESPACE})%",
    "usage": f"%DYNAMIC_METADATA({USAGE_NAMESPACE})%",
}

# --- Limits: kinds and layers (labels of metrics, operator commands, error messages, the scripts' bitmasks) -------
LIMIT_KINDS = ("tokens_per_sec", "tokens_per_min", "requests_per_min", "tokens_per_day", "concurrency")


def lua_constants() -> str:
    """The contract as Lua locals, prepended to the Lua filter's source (xds/resources.py), so the filter and
    the services cannot drift apart."""
    values = {
        "NS": USAGE_NAMESPACE, "AUTHZ_NS": AUTHZ_NAMESPACE, "USAGE_MODE_HEADER": Header.USAGE_MODE.value,
        "RELEASE_CLUSTER": RELEASE_CLUSTER, "RELEASE_PATH": RELEASE_PATH, "LEASE_KEY": AuthzMeta.LEASE.value,
        "MODE_JSON": UsageMode.JSON.value, "MODE_SSE_STRIP": UsageMode.SSE_STRIP.value,
        "MODE_SSE_NULL": UsageMode.SSE_NULL.value, "MODE_SSE_KEEP": UsageMode.SSE_KEEP.value,
    }
    lines = ["-- Generated from crosslogic/contract.py (the wire contract); do not edit here."]
    lines += [f'local {name} = "{value}"' for name, value in values.items()]
    return "\n".join(lines) + "\n"
