"""Gateway overhead: the full CrossLogic chain vs plain Envoy routing to the same simulated vLLM nodes.

Both targets run in this one process tree, against the same simulator processes, driven by the same
load generator; only the ratios are meaningful across machines.

    .venv/bin/python bench/gateway_overhead.py [--seconds 8] [--concurrency 1 16]

Full chain = Envoy + ext_authz (Python gRPC: key lookup, payload validation, rate-limit reservation in Valkey;
CROSSLOGIC_ADMISSION=rls measures the older two-hop chain with `serve ratelimit`) + Lua usage extraction +
gRPC access log -> accounting sink -> Postgres ledger. Baseline = Envoy with a static route only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import LoadResult, build_request, run_load  # noqa: E402
from crosslogic.runtime.envoy import envoy_binary  # noqa: E402
from crosslogic.runtime.processes import free_port, port_open, wait_until  # noqa: E402

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


def start_stack(state: Path, port: int, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    ready = state / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "crosslogic", "--state-dir", str(state), "up", "--demo",
                             "--port", str(port), "--ready-file", str(ready)],
                            stdout=open(state / "up.log", "wb"), stderr=subprocess.STDOUT, env=env)
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


def row(name: str, result: LoadResult) -> str:
    return (f"{name:<22} {result.rps:>9.0f} {result.p50:>9.2f} {result.percentile(99):>9.2f} "
            f"{result.errors:>7d}")


async def measure(args: argparse.Namespace, info: dict, plain_port: int) -> None:
    body = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "Hello there"}],
                       "max_tokens": 1}).encode()
    gateway_port = int(info["gateway_base"].rsplit(":", 1)[1])
    auth = {"authorization": f"Bearer {info['api_key']}"}
    plain_request = build_request("127.0.0.1", plain_port, "/v1/chat/completions", body, auth)
    full_request = build_request("127.0.0.1", gateway_port, "/v1/chat/completions", body, auth)
    print(f"{'target':<22} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    for concurrency in args.concurrency:
        plain = await run_load("127.0.0.1", plain_port, plain_request, concurrency, args.seconds)
        full = await run_load("127.0.0.1", gateway_port, full_request, concurrency, args.seconds)
        print(f"-- concurrency {concurrency}")
        print(row("envoy router only", plain))
        print(row("crosslogic full chain", full))
        print(f"   throughput ratio full/router = {full.rps / plain.rps:.2f}; "
              f"added p50 = {full.p50 - plain.p50:+.2f} ms; added p99 = "
              f"{full.percentile(99) - plain.percentile(99):+.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clp-bench-") as tmp:
        state = Path(tmp)
        stack, info = start_stack(state, free_port())
        plain, plain_port = None, 0
        try:
            nodes = [n["url"] for n in info["demo_nodes"] if n["model"] == "llama-3-8b"]
            plain, plain_port = start_plain_envoy(state, nodes)
            asyncio.run(measure(args, info, plain_port))
        finally:
            if plain:
                plain.terminate()
                plain.wait(10)
            stack.send_signal(signal.SIGTERM)
            stack.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
