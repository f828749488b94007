"""`crosslogic up`: one machine's whole stack, supervised in the foreground.

Order matters: stores, schema, control-plane services, (demo nodes), then Envoy; shutdown is the
reverse, with Envoy first so no request arrives at a service that is already gone. Every child is
restarted when it dies (crosslogic/runtime/supervision.py); runtime.json carries the supervisor's status.

Everything `up` writes is private to its user (umask 077, secrets 0600, the state dir 0700): the state dir
holds the key-hashing secret, the node CA's key, the demo key, logs and the usage spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from crosslogic.pki import init_pki
from crosslogic.runtime.backoff import Backoff
from crosslogic.runtime.envoy import BootstrapParams, EnvoyProcess
from crosslogic.runtime.internal_tls import SDS_CERT, issue_internal, write_envoy_sds
from crosslogic.runtime.ops_http import serve_ops
from crosslogic.runtime.postgres import EmbeddedPostgres
from crosslogic.runtime.processes import (
    ChildProcess,
    free_port,
    inherit_env,
    port_open,
    reserve_port,
    wait_until,
    write_private,
)
from crosslogic.runtime.state import ensure_key_secret, secure_state_dir, write_runtime
from crosslogic.runtime.supervision import Supervised, Supervisor
from crosslogic.runtime.valkey import EmbeddedValkey
from crosslogic.runtime.valkey_cluster import EmbeddedValkeyCluster
from crosslogic.settings import SchedulerSettings, Settings, SupervisorSettings, load_all
from crosslogic.store.db import migrate

log = logging.getLogger("crosslogic.up")


@dataclass
class UpOptions:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    demo: bool = False
    ready_file: Path | None = None
    demo_nodes: int = 2
    log_level: str = "INFO"
    json_output: bool = False  # print the connection details as one JSON line instead of the banner
    # Active-active replicas of every control-plane service and of Envoy (docs/deploy.md, "Replicas").
    replicas: int = 1
    envoys: int | None = None  # Envoy gateways; None = `replicas` (bench/scaleout.py varies the two apart)
    redis_cluster: bool = False  # a 3-primary Valkey Cluster (with a replica each) instead of one Valkey
    airgap: bool = False  # no socket to anything but loopback in any process, no Stripe, licences (docs/sites.md)
    internal_tls: bool = False  # mutual TLS on every Envoy-to-service hop (docs/deploy.md, "Internal mutual TLS")


@dataclass
class Stack:
    options: UpOptions
    postgres: EmbeddedPostgres | None = None
    valkey: EmbeddedValkey | None = None
    valkey_cluster: EmbeddedValkeyCluster | None = None
    services: list[ChildProcess] = field(default_factory=list)
    envoy: EnvoyProcess | None = None  # the first gateway (every gateway: `envoys`)
    envoys: list[EnvoyProcess] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    # Every child once it first answered, with its readiness probe: what the supervisor restarts.
    supervised: list[Supervised] = field(default_factory=list)

    def children(self) -> list[ChildProcess]:
        return list(self.services) + [envoy.child for envoy in self.envoys if envoy.child]


def _python(*argv: str) -> list[str]:
    # -P: never import crosslogic from the working directory (a source checkout) instead of the installed one.
    return [sys.executable, "-P", "-m", *argv]


def _service(name: str, argv: list[str], logs: Path, env: dict[str, str]) -> ChildProcess:
    return ChildProcess(name, _python("crosslogic", *argv), logs / f"{name}.log", env=env)


def _start_and_wait(stack: Stack, child: ChildProcess, port: int) -> None:
    child.start()
    ready = lambda: port_open("127.0.0.1", port)  # noqa: E731
    wait_until(ready, 30, child.name, child.proc)
    stack.supervised.append(Supervised(child.name, lambda: child, child.start, ready))


# What `--replicas N` runs N of: every service without a leader ("ratelimit" exists only with admission "rls").
# Not the fleet: its decisions are safe N times over (each pool under its advisory lock), but the local provider's
# machines are child processes of the replica that launched them, which alone can stop them.
REPLICATED = ("authz", "ratelimit", "accounting", "api", "xds")


def _many(ports: list[int]) -> int | tuple[int, ...]:
    return ports[0] if len(ports) == 1 else tuple(ports)


def _service_argv(options: UpOptions, admission: str, transport: str, ports: dict[str, int],
                  rls: bool, sites: tuple[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """The control-plane services in start order, each with its `crosslogic serve` arguments; `sites`: the site
    xDS and site API listen addresses (the first replica serves on-prem sites, docs/sites.md)."""
    site_xds, site_api = (["--site-listen", sites[0]], ["--site-listen", sites[1]]) if sites else ([], [])
    return [
        ("authz", ["serve", "authz", "--listen", f"127.0.0.1:{ports['authz']}", "--transport", transport,
                   "--release-listen", f"127.0.0.1:{ports['release']}"]),
        *([("ratelimit", ["serve", "ratelimit", "--listen", f"127.0.0.1:{ports['ratelimit']}"])] if rls else []),
        ("accounting", ["serve", "accounting", "--listen", f"127.0.0.1:{ports['accounting']}", *site_api]),
        # The admin API and dashboard: the api process's second listener, loopback, no Envoy route to it.
        ("api", ["serve", "api", "--listen", f"127.0.0.1:{ports['api']}",
                 "--admin-listen", f"127.0.0.1:{ports['admin_api']}"]),
        ("xds", ["serve", "xds", "--listen", f"127.0.0.1:{ports['xds']}", "--gateway-host", options.host,
                 "--gateway-port", str(options.port), "--nodeagent-listen", f"127.0.0.1:{ports['nodeagent']}",
                 "--admission", admission, "--transport", transport, *site_xds]),
        # The GPU autoscaler (docs/fleet.md): launches nodes only for pools with a fleet policy row.
        ("fleet", ["serve", "fleet", "--listen", f"127.0.0.1:{ports['fleet']}"]),
    ]


def _http_status(url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    # Our own listener on this machine, asked only whether it answers: its certificate (GATEWAY_TLS_CERT) may
    # be for the public name, not for the loopback address this probe dials.
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def start_stack(stack: Stack) -> Stack:
    """Starts everything into `stack` (so a failure half-way can still stop what did start)."""
    options = stack.options
    if options.airgap:  # every child inherits it and installs the guard first thing (runtime/airgap.py)
        os.environ["CROSSLOGIC_AIRGAP"] = "1"
        from crosslogic.runtime import airgap

        airgap.install_from_environment()
    load_all()  # a bad CROSSLOGIC_* value fails here in one line, not later in a child's log
    os.umask(0o077)  # every file up and its children create (logs, usage spool, Valkey's AOF) is private
    state = options.state_dir.resolve()
    secure_state_dir(state)
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if port_open(options.host, options.port):
        raise RuntimeError(f"{options.host}:{options.port} is already in use; pick another with --port")
    # Envoy binds the gateway port last (its listener comes over xDS): until then it looks free, and a service
    # given the same port would take it first.
    reserve_port(options.port)
    settings = Settings()
    secret = settings.key_secret or ensure_key_secret(state)

    database_url = settings.database_url
    if not database_url:
        postgres = stack.postgres = EmbeddedPostgres(state / "postgres").start()
        database_url = postgres.url
        stack.supervised.append(Supervised("postgres", lambda: postgres.child, postgres.spawn, postgres.ready))
    redis_url = settings.redis_url
    redis_cluster = settings.redis_cluster
    if not redis_url and options.redis_cluster:
        cluster = stack.valkey_cluster = EmbeddedValkeyCluster(state / "valkey-cluster").start()
        redis_url, redis_cluster = cluster.url, True
        for node in cluster.nodes:
            stack.supervised.append(Supervised(node.name, lambda node=node: node.child, node.spawn, node.ready))
    elif not redis_url:
        valkey = stack.valkey = EmbeddedValkey(state / "valkey").start()
        redis_url = valkey.url
        stack.supervised.append(Supervised("valkey", lambda: valkey.child, valkey.spawn, valkey.ready))
    asyncio.run(migrate(database_url))

    # Node agents authenticate with certificates from this machine's control-plane CA (mutual TLS).
    pki_dir = Path(settings_pki_dir) if (settings_pki_dir := SchedulerSettings().pki_dir) else state / "pki"
    if not (pki_dir / "server.pem").exists():
        init_pki(pki_dir, ["127.0.0.1", "localhost"])
    # Production mode: Envoy-to-service hops over mutual TLS. Issued afresh at every start (90-day certificates;
    # a restart is a rotation), from an internal CA of their own (runtime/internal_tls.py says why not pki_dir's).
    internal_tls_dir = settings.internal_tls_dir
    if not internal_tls_dir and (options.internal_tls or SupervisorSettings().internal_tls):
        internal_tls_dir = str(pki_dir / "internal")
        issue_internal(Path(internal_tls_dir), ["127.0.0.1", "localhost"])
    elif internal_tls_dir and not (Path(internal_tls_dir) / SDS_CERT).exists():
        write_envoy_sds(Path(internal_tls_dir))
    usage_dir = state / "usage"
    usage_dir.mkdir(parents=True, exist_ok=True)
    env = inherit_env(CROSSLOGIC_DATABASE_URL=database_url, CROSSLOGIC_REDIS_URL=redis_url,
                      CROSSLOGIC_KEY_SECRET=secret, CROSSLOGIC_PKI_DIR=str(pki_dir),
                      CROSSLOGIC_USAGE_LOG=settings.usage_log_path or str(usage_dir / "envoy-usage.jsonl"),
                      CROSSLOGIC_LOG_LEVEL=options.log_level)
    if redis_cluster:
        env["CROSSLOGIC_REDIS_CLUSTER"] = "1"
    if internal_tls_dir:
        env["CROSSLOGIC_INTERNAL_TLS_DIR"] = internal_tls_dir
    ports = {name: free_port() for name in ("xds", "authz", "release", "ratelimit", "accounting", "api", "admin",
                                            "nodeagent", "fleet", "admin_api",
                                            "accounting_metrics", "authz_metrics", "ratelimit_metrics",
                                            "api_metrics", "xds_metrics", "supervisor_metrics", "envoy_stats")}
    ports["supervisor_metrics"] = SupervisorSettings().supervisor_metrics_port or ports["supervisor_metrics"]
    ports["envoy_stats"] = settings.envoy_stats_port or ports["envoy_stats"]
    # Every service's /metrics, /healthz and /readyz (docs/observability.md); the fleet serves them on its own port.
    for name, configured in (("accounting_metrics", settings.accounting_metrics_port),
                             ("authz_metrics", settings.authz_metrics_port),
                             ("ratelimit_metrics", settings.ratelimit_metrics_port),
                             ("api_metrics", settings.api_metrics_port),
                             ("xds_metrics", settings.xds_metrics_port)):
        ports[name] = configured or ports[name]
        env[f"CROSSLOGIC_{name.upper()}_PORT"] = str(ports[name])
    for name, value in (("FLEET_CONTROL_PLANE", f"127.0.0.1:{ports['nodeagent']}"),
                        ("FLEET_WORKDIR", str(state / "fleet"))):
        env[f"CROSSLOGIC_{name}"] = env.get(f"CROSSLOGIC_{name}") or value
    # Rate-limit admission: inside ext_authz (default), or Envoy's ratelimit filter + `serve ratelimit`.
    env["CROSSLOGIC_ADMISSION"] = settings.admission
    rls = settings.admission == "rls"
    # ext_authz's transport: Envoy's authz cluster and filter follow it. With "http" the one HTTP server answers
    # checks and POST /release on one port; with "grpc" the release endpoint has its own.
    transport = settings.authz_transport
    env["CROSSLOGIC_AUTHZ_TRANSPORT"] = transport
    if transport == "http":
        ports["release"] = ports["authz"]
    replicas = max(1, options.replicas)
    envoys = max(1, options.envoys or replicas)
    admin_ports = [ports["admin"], *(free_port() for _ in range(envoys - 1))]
    # The accounting service rotates Envoy's usage log and asks every Envoy to reopen it.
    env["CROSSLOGIC_ENVOY_ADMIN_URL"] = ",".join(f"http://127.0.0.1:{port}" for port in admin_ports)
    # Per replica: its own listen, metrics and NodeAgent ports; replica 1 keeps the ports of the single stack.
    replica_ports: dict[str, list[int]] = {}
    supervisor_settings = SupervisorSettings()
    site_listens = (supervisor_settings.site_xds_listen or f"127.0.0.1:{free_port()}",
                    supervisor_settings.site_api_listen or f"127.0.0.1:{free_port()}")
    for index in range(replicas):
        own = ports if index == 0 else {name: free_port() for name in ports}
        if transport == "http":
            own["release"] = own["authz"]
        child_env = env if index == 0 else {
            **env, **{f"CROSSLOGIC_{name.upper()}_PORT": str(own[name])
                      for name in ("accounting_metrics", "authz_metrics", "ratelimit_metrics", "api_metrics",
                                   "xds_metrics")}}
        for name, argv in _service_argv(options, settings.admission, transport, own, rls=rls,
                                        sites=site_listens if index == 0 else None):
            if index > 0 and name not in REPLICATED:
                continue
            replica_ports.setdefault(name, []).append(own[name])
            if name == "authz":
                replica_ports.setdefault("release", []).append(own["release"])
            child = _service(f"{name}-{index + 1}" if replicas > 1 and name in REPLICATED else name, argv, logs,
                             child_env)
            stack.services.append(child)
            _start_and_wait(stack, child, own[name])
    api_child = next(c for c in stack.services if c.name in ("api", "api-1"))
    wait_until(lambda: port_open("127.0.0.1", ports["admin_api"]), 30, "admin API", api_child.proc)

    demo: dict = {}
    if options.demo:
        demo = _start_demo(stack, database_url, secret.encode(), logs, env)

    if bool(settings.gateway_tls_cert) != bool(settings.gateway_tls_key):
        raise RuntimeError("set both CROSSLOGIC_GATEWAY_TLS_CERT and CROSSLOGIC_GATEWAY_TLS_KEY, or neither")
    scheme = "https" if settings.gateway_tls_cert else "http"
    gateway_url = f"{scheme}://{options.host}:{options.port}"
    for index, admin_port in enumerate(admin_ports):
        # Every gateway listens on the one gateway port (the xDS listener binds with SO_REUSEPORT, the kernel
        # spreads connections over them) and lists every replica of every service.
        envoy = EnvoyProcess(logs, BootstrapParams(
            node_id=f"gateway-{index + 1}", admin_port=admin_port, xds_port=_many(replica_ports["xds"]),
            authz_port=_many(replica_ports["authz"]), release_port=_many(replica_ports["release"]),
            authz_transport=transport, accounting_port=_many(replica_ports["accounting"]),
            api_port=_many(replica_ports["api"]),
            ratelimit_port=_many(replica_ports.get("ratelimit", [ports["ratelimit"]])),
            stats_port=ports["envoy_stats"] if index == 0 else free_port(), stats_host=options.host,
            otlp_endpoint=settings.otlp_endpoint, internal_tls_dir=internal_tls_dir),
            name="envoy" if envoys == 1 else f"envoy-{index + 1}").start()
        stack.envoys.append(envoy)
        stack.envoy = stack.envoy or envoy
        assert envoy.child is not None
        wait_until(lambda: _http_status(f"{gateway_url}/healthz") == 200, 30, "gateway listener", envoy.child.proc)
        if demo:
            _wait_demo_route(envoy, gateway_url, demo["api_key"], options.airgap)
        # Ready again after a restart: the admin says the initial xDS arrived and the gateway port answers.
        stack.supervised.append(Supervised(envoy.name, lambda envoy=envoy: envoy.child, envoy.spawn,
                                           lambda envoy=envoy: envoy.ready() and port_open(options.host, options.port)))

    stack.info = {"gateway_url": f"{gateway_url}/v1", "gateway_base": gateway_url, "database_url": database_url,
                  "redis_url": redis_url, "redis_cluster": redis_cluster, "envoy_admin_url": f"http://127.0.0.1:{ports['admin']}",
                  "ports": ports, "nodeagent_address": f"127.0.0.1:{ports['nodeagent']}", "pki_dir": str(pki_dir),
                  "internal_tls_dir": internal_tls_dir,
                  "pid": os.getpid(), "admission": settings.admission,
                  "authz_transport": transport, "state_dir": str(state), "replicas": replicas,
                  "replica_ports": replica_ports, "envoy_admin_urls": [f"http://127.0.0.1:{p}" for p in admin_ports],
                  "admin_url": f"http://127.0.0.1:{ports['admin_api']}",
                  "site_xds_address": site_listens[0], "site_api_url": f"https://{site_listens[1]}", **demo}
    write_runtime(state, stack.info)
    return stack


def announce_ready(options: UpOptions, info: dict) -> None:
    """The ready file, written once nothing is left that can fail: the supervisor's own listener was bound
    after it once, and a port taken meanwhile stopped the whole stack right after it said ready."""
    if options.ready_file:  # holds the plaintext demo key: 0600, like everything in the state dir
        write_private(options.ready_file, json.dumps(info, indent=2))


def _start_demo(stack: Stack, database_url: str, secret: bytes, logs: Path, env: dict[str, str]) -> dict:
    import asyncpg

    from crosslogic.store.demo import seed_demo

    # Real vLLM serves one model per process: two chat nodes (the pool) and one embedding node.
    plan = [(f"demo-node-{i}", "llama-3-8b") for i in range(1, stack.options.demo_nodes + 1)]
    plan.append(("demo-embed-1", "bge-small"))
    nodes = []
    for name, model in plan:
        port = free_port()
        argv = _python("crosslogic.sim", "--host", "127.0.0.1", "--port", str(port), "--node-name", name,
                       "--model", model)
        child = ChildProcess(name, argv, logs / f"{name}.log", env=env)
        stack.services.append(child)
        _start_and_wait(stack, child, port)
        nodes.append((name, "127.0.0.1", port, [model]))

    async def seed() -> dict:
        conn = await asyncpg.connect(database_url)
        try:
            return await seed_demo(conn, secret, nodes)
        finally:
            await conn.close()

    demo = asyncio.run(seed())
    demo["demo_nodes"] = [{"name": name, "url": f"http://{host}:{port}", "model": models[0]}
                          for name, host, port, models in nodes]
    return demo


def _wait_demo_route(envoy: EnvoyProcess, gateway_url: str, api_key: str, airgap: bool = False) -> None:
    """Ready = the demo key authenticates and Envoy holds healthy hosts for the demo pool.

    (No completion is sent: a readiness probe must not leave a billed request in the ledger.) Air-gapped, the demo
    org has no licence until the operator installs one: its key's 403 license_required says it authenticated.
    """
    accepted = (200, 403) if airgap else (200,)

    def pool_has_hosts() -> bool:
        try:
            return "ap-south/llama-3-8b::" in envoy.admin_get("/clusters")
        except OSError:
            return False

    headers = {"authorization": f"Bearer {api_key}"}
    wait_until(pool_has_hosts, 30, "demo pool in Envoy")
    wait_until(lambda: _http_status(f"{gateway_url}/v1/models", headers) in accepted, 30,
               "demo key through the gateway")


def stop_stack(stack: Stack) -> None:
    for envoy in stack.envoys:
        envoy.stop()
    for child in reversed(stack.services):
        child.stop()
    if stack.valkey:
        stack.valkey.stop()
    if stack.valkey_cluster:
        stack.valkey_cluster.stop()
    if stack.postgres:
        stack.postgres.stop()


def banner(info: dict) -> str:
    url = info["gateway_url"]
    lines = [f"CrossLogic gateway: {url}", f"Database: {info['database_url']}", f"Redis: {info['redis_url']}",
             f"Admin API and developer dashboard: {info['admin_url']}/dashboard/ (OpenAPI: {info['admin_url']}"
             "/openapi.json)"]
    if "admin_token" in info:
        lines += [f"Platform admin token: {info['admin_token']}",
                  f"Dashboard token of org 'demo' (admin): {info['org_admin_token']}"]
    if "api_key" in info:
        key = info["api_key"]
        lines += [
            f"Demo API key (org 'demo', env 'dev'): {key}",
            f"  (kept in {info['state_dir']}/runtime.json, mode 0600; shown again by every `crosslogic up`)",
            "",
            "Try it:",
            f"  curl {url}/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' "
            "-d '{\"model\": \"llama-3-8b\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'",
            "",
            f"  {sys.executable} -c \"from openai import OpenAI; "
            f"c = OpenAI(base_url='{url}', api_key='{key}'); "
            "print(c.chat.completions.create(model='llama-3-8b', "
            "messages=[{'role': 'user', 'content': 'Hello'}]).choices[0].message.content)\"",
        ]
    lines += ["", "Ctrl-C stops everything."]
    return "\n".join(lines)


def _supervisor(stack: Stack, state: Path) -> Supervisor:
    settings = SupervisorSettings()
    backoff = Backoff(initial_s=settings.restart_backoff_s, maximum_s=settings.restart_backoff_max_s,
                      healthy_after_s=settings.healthy_after_s)

    def publish() -> None:  # runtime.json: where the CLI, operators and tests read the stack's health
        write_runtime(state, {**stack.info, "supervisor": supervisor.status()})

    supervisor = Supervisor(backoff, settings.ready_timeout_s, on_change=publish)
    for child in stack.supervised:
        supervisor.add(child)
    return supervisor


def _serve_supervisor_ops(supervisor: Supervisor, port: int):
    """/metrics (children ready, restarts, degraded), /healthz, /readyz (every child ready) of `crosslogic up`."""

    def probe() -> tuple[bool, dict[str, dict]]:
        children = supervisor.status()["children"]
        return not supervisor.degraded, {name: {"ok": c["state"] == "ready", "detail": c["state"]}
                                         for name, c in children.items()}

    return serve_ops(port, "supervisor", lambda: True, probe, registry=supervisor.registry)


def run_up(options: UpOptions) -> int:
    stopping = False

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = Stack(options)
    ops = contextlib.ExitStack()
    try:
        start_stack(stack)
        supervisor = _supervisor(stack, options.state_dir.resolve())
        ops.enter_context(_serve_supervisor_ops(supervisor, stack.info["ports"]["supervisor_metrics"]))
        write_runtime(options.state_dir.resolve(), {**stack.info, "supervisor": supervisor.status()})
        announce_ready(options, stack.info)
        if options.json_output:
            print(json.dumps(stack.info), flush=True)
        else:
            print(banner(stack.info), flush=True)
        while not stopping:
            time.sleep(0.1)
            if not stopping:
                supervisor.poll()
        return 0
    except (RuntimeError, OSError) as exc:  # OSError: a port taken (TimeoutError is one too)
        print(f"crosslogic up failed: {exc}", file=sys.stderr)
        for child in stack.children():
            if not child.running:
                print(f"--- {child.name} log ---\n{child.log_tail()}", file=sys.stderr)
        return 1
    finally:
        stop_stack(stack)
        ops.close()
