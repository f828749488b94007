"""Envoy resources as protobuf messages: listener, routes, pool clusters and their endpoints.

Small resources are written as dicts and parsed once per build; endpoint assignments, which can hold
thousands of hosts, use the direct proto API (ParseDict is ~10x slower there, DESIGN.md §3).
"""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2 as _accesslog  # noqa: F401
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.config.trace.v3 import opentelemetry_pb2 as _opentelemetry  # noqa: F401

# Registers every type the dict-built resources name in "@type".
from envoy.extensions.access_loggers.file.v3 import file_pb2 as _file_log  # noqa: F401
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2 as _cel  # noqa: F401
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as _als  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as _ext_authz  # noqa: F401
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2 as _header_mutation  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2 as _lua  # noqa: F401
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2 as _ratelimit  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2 as _router  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2 as _hcm,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2 as _previous_hosts  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2 as _tls  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as _upstream_http  # noqa: F401
from google.protobuf import json_format
from google.protobuf.wrappers_pb2 import UInt32Value

from crosslogic import errors
from crosslogic.contract import (
    ACCESS_LOG_NAME,
    ACCOUNTING_CLUSTER,
    API_CLUSTER,
    AUTHZ_CHECK_PREFIX,
    AUTHZ_CLUSTER,
    AUTHZ_NAMESPACE,
    CLIENT_ADDRESS_HEADER,
    DESCRIPTOR_METADATA_KEYS,
    DESCRIPTOR_REQUEST_ID,
    GATEWAY_TRACE_SERVICE,
    METADATA_HEADERS,
    OTEL_CLUSTER,
    RATELIMIT_CLUSTER,
    RATELIMIT_DOMAIN,
    RATELIMIT_HEADER_PREFIX,
    REFUSAL_CLIENT_HEADERS,
    REQUEST_ID_HEADER,
    SITE_ORG_HEADER,
    USAGE_LOG_FORMAT,
    AuthzMeta,
    Header,
    lua_constants,
)
from crosslogic.runtime.envoy import envoy_asset
from crosslogic.xds.local_replies import local_reply_config
from crosslogic.xds.model import EndpointHealth, GatewaySettings, Pool

ROUTE_CONFIG_NAME = "gateway"
LISTENER_NAME = "gateway"

_HEALTH = {
    EndpointHealth.HEALTHY: health_check_pb2.HEALTHY,
    EndpointHealth.DRAINING: health_check_pb2.DRAINING,
    EndpointHealth.DEGRADED: health_check_pb2.DEGRADED,
    EndpointHealth.UNHEALTHY: health_check_pb2.UNHEALTHY,
}


def _direct(error: errors.ClientError) -> dict:
    # Sent as application/json by the `direct_response` local-reply mapper (xds/local_replies.py).
    return {"status": error.status, "body": {"inline_string": error.body().decode()}}


def _authz_metadata(key: str) -> dict:
    return {"metadata": {"descriptor_key": key, "source": "DYNAMIC", "metadata_key": {
        "key": AUTHZ_NAMESPACE, "path": [{"key": key}]}}}


def usage_filter_source() -> str:
    """The Lua filter as xDS sends it: the contract's constants, then the filter."""
    return lua_constants() + envoy_asset("lua/usage.lua")


def _ratelimit_filter(settings: GatewaySettings) -> dict:
    """Admission "rls" only (by default ext_authz reserves itself, one hop instead of two): one descriptor per
    request to `crosslogic serve ratelimit`, from ext_authz's metadata (DESIGN.md §4).

    Requests without a model (e.g. /v1/models) lack `reserve`, so no descriptor and no call is made.
    """
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": RATELIMIT_DOMAIN,
            "timeout": f"{settings.authz_timeout_ms / 1000:.3f}s",
            # Redis-down policy is decided per layer by the service; when the service itself cannot
            # answer, refuse with a 503 rather than run unlimited.
            "failure_mode_deny": True,
            "disable_x_envoy_ratelimited_header": True,  # no implementation details to clients
            "status_on_error": {"code": 503},
            "rate_limit_service": {"grpc_service": {"envoy_grpc": {"cluster_name": RATELIMIT_CLUSTER}},
                                   "transport_api_version": "V3"},
            "rate_limits": [{"actions": [
                *(_authz_metadata(key) for key in DESCRIPTOR_METADATA_KEYS),
                {"request_headers": {"header_name": REQUEST_ID_HEADER, "descriptor_key": DESCRIPTOR_REQUEST_ID}},
            ]}],
        },
    }


# Response headers no client may see, whoever set them (Envoy, a node, our services). First in the chain, so
# it is the last filter every response passes, local replies of later filters included.
HIDDEN_RESPONSE_HEADER_PREFIXES = ("x-envoy-", "x-clp-")


def _hide_internal_headers() -> dict:
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"response_mutations": [{"remove_on_match": {"key_matcher": {"prefix": prefix}}}
                                                 for prefix in HIDDEN_RESPONSE_HEADER_PREFIXES]},
        },
    }


# A check whose ext_authz replica died (refused connection, or reset with the check in flight) goes to another
# replica (`crosslogic up --replicas N`, docs/deploy.md): checks are idempotent per request id (the reserve
# script answers "already reserved" to a repeat), so a retry never charges twice. Nothing else is retried: an
# answer, whatever its status, is ext_authz's decision. With one replica the retries meet the same refusal.
# Measured (Envoy 1.40): the ext_authz client takes its per-try timeout from retry_back_off.max_interval, so
# that is the whole check timeout here; the backoff itself stays at a few ms (base 5 ms, two retries).
_PREVIOUS_HOSTS = [{"name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions"
                                              ".retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]


def _authz_retry_policy(settings: GatewaySettings) -> dict:
    return {"retry_on": "connect-failure,refused-stream,reset", "num_retries": 2,
            "retry_back_off": {"base_interval": "0.005s",
                               "max_interval": f"{settings.authz_timeout_ms / 1000:.3f}s"},
            "retry_host_predicate": _PREVIOUS_HOSTS, "host_selection_retry_max_attempts": 5}


def _grpc_authz(settings: GatewaySettings) -> dict:
    """The standard envoy.service.auth.v3.Authorization service (extauthz/grpc_transport.py)."""
    return {
        "grpc_service": {"envoy_grpc": {"cluster_name": AUTHZ_CLUSTER},
                         "timeout": f"{settings.authz_timeout_ms / 1000:.3f}s",
                         "retry_policy": _authz_retry_policy(settings)},
        "with_request_body": {"max_request_bytes": settings.max_request_bytes, "allow_partial_message": False,
                              "pack_as_bytes": True},
    }


def _exact(names) -> list[dict]:
    return [{"exact": name} for name in names]


# Never sent to the HTTP authz server: framing and connection headers of the client's hop. Envoy re-frames the
# body with a content-length (a client's `transfer-encoding: chunked` next to it would be a smuggling-shaped
# request, which the server refuses), and nothing of the client's connection concerns Envoy's own to ext_authz.
AUTHZ_HOP_HEADERS = ("transfer-encoding", "connection", "keep-alive", "proxy-connection", "upgrade", "te",
                     "trailer", "expect", "http2-settings")


def _http_authz(settings: GatewaySettings) -> dict:
    """Envoy's `http_service` to ext_authz's HTTP/1.1 server (extauthz/http_transport.py says what each header
    of the answer does): every client header but the hop ones goes along, since ext_authz removes what a node
    must not get by name."""
    ratelimit_headers = {"prefix": RATELIMIT_HEADER_PREFIX}
    return {
        "http_service": {
            "server_uri": {"uri": "http://crosslogic-authz", "cluster": AUTHZ_CLUSTER,
                           "timeout": f"{settings.authz_timeout_ms / 1000:.3f}s"},
            "path_prefix": AUTHZ_CHECK_PREFIX,
            "retry_policy": _authz_retry_policy(settings),
            "authorization_request": {"headers_to_add": [
                {"key": CLIENT_ADDRESS_HEADER, "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"},
                *([{"key": SITE_ORG_HEADER, "value": settings.site_org}] if settings.site_org else [])]},
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": _exact(h.value for h in Header)},
                "allowed_client_headers": {"patterns": [*_exact(REFUSAL_CLIENT_HEADERS), ratelimit_headers]},
                "allowed_client_headers_on_success": {"patterns": [ratelimit_headers]},
                "dynamic_metadata_from_headers": {"patterns": _exact(METADATA_HEADERS)},
            },
        },
        "allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]},
        "disallowed_headers": {"patterns": _exact(AUTHZ_HOP_HEADERS)},
        "with_request_body": {"max_request_bytes": settings.max_request_bytes, "allow_partial_message": False},
    }


def _http_filters(settings: GatewaySettings) -> list[dict]:
    return [
        _hide_internal_headers(),
        {
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                **(_grpc_authz(settings) if settings.authz_transport == "grpc" else _http_authz(settings)),
                "failure_mode_allow": False,
                "status_on_error": {"code": 503},
                "clear_route_cache": True,  # we route on x-clp-route, which authz sets
            },
        },
        *([_ratelimit_filter(settings)] if settings.admission == "rls" else []),
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": usage_filter_source()},
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                             # no x-envoy-upstream-service-time / -overloaded / -attempt-count to anyone
                             "suppress_envoy_headers": True},
        },
    ]



def _billable() -> dict:
    """Only requests ext_authz identified carry something to bill (the others' entries would be decoded and
    dropped by the sink: bench/abuse.py's floods of bad keys cost the accounting service nothing now)."""
    return {"metadata_filter": {"matcher": {"filter": AUTHZ_NAMESPACE, "path": [
        {"key": AuthzMeta.ORG_ID}], "value": {"present_match": True}}, "match_if_key_not_found": False}}


def _usage_file_log(path: str) -> dict:
    return {
        "name": "envoy.access_loggers.file",
        "filter": _billable(),
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"json_format": USAGE_LOG_FORMAT},
        },
    }


def _access_log(settings: GatewaySettings) -> list[dict]:
    file_log = [_usage_file_log(settings.usage_log_path)] if settings.usage_log_path else []
    return file_log + [{
        "name": "envoy.access_loggers.http_grpc",
        "filter": _billable(),
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": ACCESS_LOG_NAME,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": ACCOUNTING_CLUSTER}},
                "buffer_flush_interval": f"{settings.als_flush_interval_ms / 1000:.3f}s",
                "buffer_size_bytes": 16384,
                "grpc_stream_retry_policy": {"num_retries": 10},
            },
        },
    }]


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _client_bounds(settings: GatewaySettings) -> dict:
    """How long and how much a client may take (issue 9, slow clients): each bound is a JSON 408/431 or a
    closed connection, measured with raw sockets in tests/test_edges.py. The node's side is bounded per
    route (`_pool_route`), so none of these can cut a generation that keeps streaming."""
    return {
        # From the first byte of a request to its last header (a slowloris dripping headers).
        "request_headers_timeout": _seconds(settings.request_headers_timeout_s),
        # Until the whole request (body included) was received; disarmed once it went upstream, so it never
        # bounds the answer.
        "request_timeout": _seconds(settings.request_timeout_s),
        # No byte either way. While the request arrives (ext_authz holds the body, so the route is not chosen
        # yet) this must outlast request_timeout, which then answers 408 first. Pool routes set their own:
        # the node's silence (`_pool_route`).
        "stream_idle_timeout": _seconds(2 * settings.request_timeout_s),
        "common_http_protocol_options": {
            "idle_timeout": _seconds(settings.connection_idle_timeout_s),  # a keep-alive connection, unused
            "max_headers_count": settings.max_request_headers,
        },
        "max_request_headers_kb": settings.max_request_headers_kib,
        # HTTP/1.0 clients (curl -0, old tools) get answers rather than a 426.
        "http_protocol_options": {"accept_http_10": True, "default_host_for_http_10": "crosslogic"},
        # Which x-forwarded-for entry is the client: only the hops we run (load balancers) are trusted.
        "xff_num_trusted_hops": settings.xff_trusted_hops,
    }


def _tracing(settings: GatewaySettings) -> dict:
    """OpenTelemetry (off unless CROSSLOGIC_OTLP_ENDPOINT): one span per request, a child span for the ext_authz
    call and one for the call to the node (spawn_upstream_span), W3C traceparent sent to both, OTLP/gRPC to
    the bootstrap's collector cluster. Spans carry Envoy's request id (x-request-id is the ledger's key)."""
    if not settings.trace_sample_percent:
        return {}
    return {"tracing": {
        "random_sampling": {"value": settings.trace_sample_percent},
        "spawn_upstream_span": True,
        "custom_tags": [{"tag": "crosslogic.request_id",
                         "request_header": {"name": REQUEST_ID_HEADER, "default_value": ""}}],
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "1s"},
            "service_name": GATEWAY_TRACE_SERVICE}},
    }}


def build_listener(settings: GatewaySettings, name: str = LISTENER_NAME,
                   host: str | None = None, port: int | None = None) -> listener_pb2.Listener:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        # Treat every client as external: Envoy issues its own x-request-id (the ledger key), so a
        # client cannot collide or replay request ids.
        "use_remote_address": True,
        "preserve_external_request_id": False,
        "always_set_request_id_in_response": True,
        "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"},
                "route_config_name": ROUTE_CONFIG_NAME},
        "http_filters": _http_filters(settings),
        "access_log": _access_log(settings),
        "local_reply_config": local_reply_config(settings.max_request_headers, settings.max_request_headers_kib,
                                                 settings.max_request_bytes),
        **_client_bounds(settings),
        "server_name": "crosslogic",  # replaces the server header of every reply (nodes', aiohttp's, Envoy's)
        **_tracing(settings),
    }
    listener = {
        "name": name,
        "address": {"socket_address": {"address": host or settings.listen_host,
                                       "port_value": port or settings.listen_port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}],
                           **({"transport_socket": _public_tls(settings)} if settings.tls_cert_path else {})}],
    }
    return json_format.ParseDict(listener, listener_pb2.Listener())


def _public_tls(settings: GatewaySettings) -> dict:
    """HTTPS on the public listener: the certificate from files on the Envoy's host (a mounted Secret in
    Kubernetes), HTTP/2 or HTTP/1.1 as the client's ALPN asks (the connection manager's codec is AUTO), TLS 1.2+."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "tls_certificates": [{"certificate_chain": {"filename": settings.tls_cert_path},
                                  "private_key": {"filename": settings.tls_key_path}}],
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        },
    }}


def _pool_route(pool: Pool, settings: GatewaySettings) -> dict:
    return {
        "name": pool.cluster_name,
        "match": {"prefix": "/v1/", "headers": [{"name": Header.ROUTE,
                                                 "string_match": {"exact": pool.route_key}}]},
        "route": {
            "cluster": pool.cluster_name,
            # A generation that keeps streaming is never cut, however long: no total timeout. What is bounded
            # is silence (this route's stream idle timeout): the node's before its answer (queue, or the whole
            # of a non-streamed generation) and between chunks. Over it, a JSON 504 (before the answer) or a
            # cut stream. Not the router's per_try_idle_timeout: `reset` in retry_on would retry it, running a
            # slow generation again on another node (measured: 3 runs for retries 2).
            "timeout": "0s",
            "idle_timeout": _seconds(settings.upstream_idle_timeout_s),  # applies once the request is in
            "retry_policy": {
                # Only failures before the node answered: a generation is never run twice on purpose.
                # `reset` also covers a node that died mid-request before sending response headers (its
                # output was never delivered nor billed, so running it elsewhere is safe); a stream whose
                # headers were sent is never retried by Envoy.
                "retry_on": "connect-failure,refused-stream,reset-before-request,reset,retriable-status-codes",
                "retriable_status_codes": [503],
                "num_retries": settings.retries if pool.retries is None else pool.retries,
                "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions"
                                                           ".retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
                # LEAST_REQUEST favours a just-died node (it has no requests in flight): with 2 hosts a pick
                # lands on it 3 times in 4, so 5 attempts left 1 retry in 4 on the dead node again.
                "host_selection_retry_max_attempts": 20,
            },
        },
    }


def _pool_routes(pool: Pool, settings: GatewaySettings) -> list[dict]:
    """One route per pool; a throttled pool (spill share < 1) gets two: that share of requests (at random) may
    use the fallback regions, the rest only the region's own nodes (503 "no capacity" when it is down)."""
    if pool.local_only:
        return []  # reached through the second route of its throttled pool
    route = _pool_route(pool, settings)
    if pool.spill_share >= 1.0:
        return [route]
    spill = {**route, "name": f"{pool.cluster_name}/spill", "match": {**route["match"], "runtime_fraction": {
        "default_value": {"numerator": round(pool.spill_share * 10000), "denominator": "TEN_THOUSAND"},
        "runtime_key": f"clp.spill.{pool.cluster_name}"}}}
    local = {**route, "name": f"{pool.cluster_name}/local",
             "route": {**route["route"], "cluster": pool.cluster_name + "#local"}}
    return [spill, local]


def _api_route() -> dict:
    """The api service's reads: a replica that died (refused or reset connection) is retried on another one."""
    return {"cluster": API_CLUSTER, "timeout": "10s",
            "retry_policy": {"retry_on": "connect-failure,refused-stream,reset", "num_retries": 2,
                             "retry_host_predicate": _PREVIOUS_HOSTS, "host_selection_retry_max_attempts": 5}}


def build_route_configuration(pools: list[Pool], settings: GatewaySettings) -> route_pb2.RouteConfiguration:
    no_authz = {"envoy.filters.http.ext_authz": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
        "disabled": True}}
    routes = [
        {"name": "healthz", "match": {"path": "/healthz"}, "typed_per_filter_config": no_authz,
         "direct_response": {"status": 200, "body": {"inline_string": '{"status": "ok"}'}}},
        # Exactly the list and one model (ids may hold "/"); `/v1/models/`, `/v1/modelsfoo` are unknown URLs.
        # Any method goes there: the api service answers what it does not serve with a JSON 405.
        {"name": "models", "match": {"path": "/v1/models"}, "route": _api_route()},
        {"name": "model", "match": {"safe_regex": {"regex": "/v1/models/.+"}}, "route": _api_route()},
        *(r for p in sorted(pools, key=lambda p: p.cluster_name) for r in _pool_routes(p, settings)),
        # Authorised, but no pool for this model in the chosen region (yet).
        {"name": "no-pool", "match": {"prefix": "/v1/", "headers": [{"name": Header.ROUTE,
                                                                     "present_match": True}]},
         "direct_response": _direct(errors.ClientError(503, "The model is not available in your region right now. "
                                                       "Please retry later.", "server_error", "model_unavailable"))},
        {"name": "unknown-url", "match": {"prefix": "/"},
         "direct_response": _direct(errors.unknown_url())},
    ]
    config = {
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{"name": "gateway", "domains": ["*"], "routes": routes}],
        "response_headers_to_remove": ["server"],
    }
    return json_format.ParseDict(config, route_pb2.RouteConfiguration())


def build_cluster(pool: Pool) -> cluster_pb2.Cluster:
    cluster = {
        "name": pool.cluster_name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        # Never send traffic to unhealthy hosts just because many are unhealthy (default 50% panic).
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "circuit_breakers": {"thresholds": [{
            "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000,
            # The default max_retries (3) failed 235/1,500 requests when a node died (DESIGN.md §4).
            "retry_budget": {"budget_percent": {"value": 100.0}, "min_retry_concurrency": 1000},
        }]},
        "outlier_detection": {"consecutive_gateway_failure": 2, "consecutive_local_origin_failure": 2,
                              "split_external_local_origin_errors": True, "interval": "1s",
                              "base_ejection_time": "5s", "max_ejection_percent": 100,
                              "enforcing_consecutive_5xx": 0},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": {"idle_timeout": "60s"},
            }
        },
    }
    return json_format.ParseDict(cluster, cluster_pb2.Cluster())


def build_load_assignment(pool: Pool) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=pool.cluster_name)
    # Strict pinning: the fallback priority takes traffic only when the local one has no healthy host.
    cla.policy.overprovisioning_factor.value = 100000
    by_priority: dict[int, endpoint_components_pb2.LocalityLbEndpoints] = {}
    for ep in pool.endpoints:
        group = by_priority.get(ep.priority)
        if group is None:
            group = cla.endpoints.add(priority=ep.priority)
            group.locality.region = pool.region
            group.load_balancing_weight.value = 1
            by_priority[ep.priority] = group
        lb = group.lb_endpoints.add(health_status=_HEALTH[ep.health])
        lb.load_balancing_weight.CopyFrom(UInt32Value(value=max(1, ep.weight)))
        lb.endpoint.address.CopyFrom(address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=ep.host, port_value=ep.port)))
        lb.endpoint.hostname = ep.node_id
        lb.metadata.filter_metadata["crosslogic"].update({"node_id": ep.node_id})
    return cla

