"""Gateway overhead: the full CrossLogic chain over each ext_authz transport vs plain Envoy routing.

    .venv/bin/python bench/gateway_overhead.py [--seconds 5] [--rounds 2] [--concurrency 1 16]
                                               [--transports grpc http] [--baseline-src DIR]
                                               [--internal-tls]

One run starts one `crosslogic up --demo` stack per transport (CROSSLOGIC_AUTHZ_TRANSPORT) and a plain Envoy
with a static route to the first stack's simulated nodes, then measures them in interleaved rounds (the order
rotates each round, so load from elsewhere on the machine falls on every target alike) with the same closed-loop
load generator; each row pools its rounds. Only the ratios are meaningful across machines.

Full chain = Envoy + ext_authz (key lookup, payload validation, rate-limit reservation in Valkey; over gRPC or
the HTTP transport; CROSSLOGIC_ADMISSION=rls measures the older two-hop chain with `serve ratelimit`) + Lua
usage extraction and lease release + gRPC access log and file log -> accounting sink -> Postgres ledger.
`--baseline-src DIR` (a checkout of another commit) adds that commit's full chain (`--baseline-transports`, HTTP
by default) to the same interleaved rounds: a before/after under the same load. Baseline = Envoy with a static
route only. "authz CPU" is the ext_authz process's CPU per request in that run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import LoadResult, build_request, run_load  # noqa: E402
from crosslogic.runtime.envoy import envoy_binary  # noqa: E402
from crosslogic.runtime.processes import free_port, port_open, wait_until  # noqa: E402
from crosslogic.settings import AUTHZ_TRANSPORTS  # noqa: E402

PLAIN_ENVOY = """
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          route_config:
            virtual_hosts:
            - {{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: nodes}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: nodes
    type: STATIC
    lb_policy: LEAST_REQUEST
    connect_timeout: 1s
    load_assignment:
      cluster_name: nodes
      endpoints: [{{lb_endpoints: [{endpoints}]}}]
"""


SOURCE_ENV = "CROSSLOGIC_BENCH_SOURCE"  # the checkout a stack runs (bench only; its services ignore it)


def start_stack(state: Path, port: int, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    ready = state / "ready.json"
    # `python -m` puts the working directory first on sys.path: a baseline checkout must be it.
    source = (env or {}).get(SOURCE_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "crosslogic", "--state-dir", str(state), "up", "--demo",
                             "--port", str(port), "--ready-file", str(ready)],
                            stdout=open(state / "up.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=source)
    wait_until(ready.exists, 120, "crosslogic up", proc)
    info = json.loads(ready.read_text())
    asyncio.run(_lift_plan_limits(info["database_url"]))
    return proc, info


async def _lift_plan_limits(database_url: str) -> None:
    """The limiter runs on every request, but its limits must not be what the benchmark measures."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE plan_limits SET tokens_per_min = 1000000000, requests_per_min = 100000000, "
                           "concurrency_limit = 100000 WHERE billing_plan = 'serverless'")
    finally:
        await conn.close()


def start_plain_envoy(state: Path, node_urls: list[str]) -> tuple[subprocess.Popen, int]:
    listen_port, admin = free_port(), free_port()
    addresses = [u.split("//")[1].split(":") for u in node_urls]
    endpoints = ", ".join(
        f"{{endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}}}"
        for host, port in addresses)
    config = state / "plain-envoy.yaml"
    config.write_text(PLAIN_ENVOY.format(admin=admin, port=listen_port, endpoints=endpoints))
    proc = subprocess.Popen([str(envoy_binary()), "-c", str(config), "--log-level", "error", "--concurrency", "2",
                             "--base-id", str(free_port())],
                            stdout=open(state / "plain-envoy.log", "wb"), stderr=subprocess.STDOUT)
    wait_until(lambda: port_open("127.0.0.1", listen_port), 30, "plain envoy", proc)
    return proc, listen_port


def transport_env(transport: str, source: Path | None = None) -> dict[str, str]:
    """The environment of a stack on `transport`; with `source` (a checkout of another commit) that commit's
    package is imported instead of this one (an A/B of two versions in one run)."""
    env = {**os.environ, "CROSSLOGIC_AUTHZ_TRANSPORT": transport}
    env.pop(SOURCE_ENV, None)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
        env[SOURCE_ENV] = str(source)
    return env


BASELINE = " (baseline)"
MTLS = " + internal mTLS"


def pooled(results: list[LoadResult]) -> LoadResult:
    return LoadResult(requests=sum(r.requests for r in results), errors=sum(r.errors for r in results),
                      seconds=sum(r.seconds for r in results),
                      latencies_ms=tuple(x for r in results for x in r.latencies_ms))


ROUTER = "envoy router only"


def _name(transport: str) -> str:
    return f"full chain, {transport.replace(BASELINE, ' @base')}"


async def measure(args: argparse.Namespace, stacks: dict[str, tuple[subprocess.Popen, dict]],
                  plain_port: int) -> None:
    from bench.cpu_per_request import cpu_by_role

    body = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "Hello there"}],
                       "max_tokens": 1}).encode()
    targets: dict[str, tuple[int, bytes, int | None]] = {}  # name -> (port, request, pid whose authz CPU counts)
    first_info = next(iter(stacks.values()))[1]
    targets[ROUTER] = (plain_port, build_request("127.0.0.1", plain_port, "/v1/chat/completions", body,
                                                 {"authorization": f"Bearer {first_info['api_key']}"}), None)
    for transport, (proc, info) in stacks.items():
        port = int(info["gateway_base"].rsplit(":", 1)[1])
        targets[_name(transport)] = (port, build_request("127.0.0.1", port, "/v1/chat/completions", body,
                                                         {"authorization": f"Bearer {info['api_key']}"}), proc.pid)
    names = list(targets)
    print(f"{'target':<28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'ratio':>6} {'+p50 ms':>8} "
          f"{'authz CPU ms/req':>17}")
    for concurrency in args.concurrency:
        runs: dict[str, list[LoadResult]] = {name: [] for name in names}
        cpu: dict[str, float] = dict.fromkeys(names, 0.0)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                port, request, pid = targets[name]
                before = cpu_by_role(pid).get("authz", 0.0) if pid else 0.0
                runs[name].append(await run_load("127.0.0.1", port, request, concurrency, args.seconds))
                cpu[name] += (cpu_by_role(pid).get("authz", 0.0) - before) if pid else 0.0
        print(f"-- concurrency {concurrency} ({args.rounds} rounds x {args.seconds:g} s, interleaved)")
        router = pooled(runs[ROUTER])
        for name in names:
            result = pooled(runs[name])
            authz = f"{1000 * cpu[name] / result.requests:.3f}" if targets[name][2] and result.requests else "-"
            print(f"{name:<28} {result.rps:>8.0f} {result.p50:>8.2f} {result.percentile(99):>8.2f} "
                  f"{result.errors:>7d} {result.rps / router.rps:>6.2f} {result.p50 - router.p50:>+8.2f} "
                  f"{authz:>17}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per target and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--transports", nargs="+", choices=AUTHZ_TRANSPORTS, default=["grpc", "http"])
    parser.add_argument("--baseline-src", type=Path, help="a checkout of another commit (git worktree add "
                        "--detach DIR <commit>): also measure its full chain, in the same rounds")
    parser.add_argument("--baseline-transports", nargs="+", choices=AUTHZ_TRANSPORTS, default=["http"])
    parser.add_argument("--internal-tls", action="store_true", help="also each transport's full chain with mutual "
                        "TLS on every Envoy-to-service hop (CROSSLOGIC_INTERNAL_TLS), in the same rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clp-bench-") as tmp:
        stacks: dict[str, tuple[subprocess.Popen, dict]] = {}
        plain = None
        try:
            runs = [(t, None) for t in args.transports]
            if args.baseline_src:
                runs += [(t, args.baseline_src.resolve()) for t in args.baseline_transports]
            for transport, source in runs:
                name = transport + (BASELINE if source else "")
                state = Path(tmp) / name.replace(" ", "_")
                state.mkdir()
                stacks[name] = start_stack(state, free_port(), transport_env(transport, source))
                if args.internal_tls and source is None:
                    state = Path(tmp) / f"{transport}_mtls"
                    state.mkdir()
                    stacks[transport + MTLS] = start_stack(state, free_port(), {
                        **transport_env(transport), "CROSSLOGIC_INTERNAL_TLS": "1"})
            nodes = [n["url"] for n in next(iter(stacks.values()))[1]["demo_nodes"] if n["model"] == "llama-3-8b"]
            plain, plain_port = start_plain_envoy(Path(tmp), nodes)
            asyncio.run(measure(args, stacks, plain_port))
        finally:
            if plain:
                plain.terminate()
                plain.wait(10)
            for proc, _ in stacks.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in stacks.values():
                proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
