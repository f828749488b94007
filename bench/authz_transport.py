"""The ext_authz transport on its own: Envoy's rendered ext_authz filter over gRPC vs over HTTP, against Envoy
routing alone, with the same trivial decision behind both (what decision.py returns for a chat request: 7 x-clp-*
headers, the client headers to remove, 10 metadata keys, 6 x-ratelimit-* headers; no Redis, no Postgres).

    .venv/bin/python bench/authz_transport.py [--seconds 5] [--rounds 3] [--concurrency 1 16]

One process serves both transports (extauthz/grpc_transport.py and http_transport.py, uvloop, as `serve authz`
runs them); one Envoy per target, each with the same listener settings (`xds/resources.build_listener`, only the
ext_authz filter and the router kept) routing to one simulated node. Targets are measured in interleaved rounds;
"authz CPU" is the serving process's CPU per request, "Envoy CPU" that target's Envoy's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_overhead import pooled  # noqa: E402
from bench.loadgen import LoadResult, build_request, run_load  # noqa: E402
from crosslogic import contract  # noqa: E402
from crosslogic.runtime.envoy import envoy_binary  # noqa: E402
from crosslogic.runtime.processes import free_port, port_open, wait_until  # noqa: E402

TRANSPORTS = ("grpc", "http")


def static_gateway_bootstrap(listen: int, authz_port: int, node_port: int, admin: int, transport: str,
                             usage_log: str = "", keep_filters: tuple[str, ...] | None = None) -> dict:
    """A bootstrap with the gateway listener xDS would send (ext_authz over `transport`), its routes replaced by
    one static route to `node_port`, and the authz and release clusters at `authz_port`. `keep_filters`: the
    HTTP filters kept, by name (default all); the gRPC access log is dropped (no accounting service here)."""
    from google.protobuf import json_format

    from crosslogic.xds.model import GatewaySettings
    from crosslogic.xds.resources import build_listener

    settings = GatewaySettings(listen_port=listen, usage_log_path=usage_log, authz_transport=transport)
    listener = json_format.MessageToDict(build_listener(settings))
    hcm = listener["filterChains"][0]["filters"][0]["typedConfig"]
    del hcm["rds"]
    hcm["routeConfig"] = {"virtualHosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "node"}}]}]}
    hcm["accessLog"] = [log for log in hcm.get("accessLog", []) if "file" in log["name"]]
    if keep_filters is not None:
        hcm["httpFilters"] = [f for f in hcm["httpFilters"] if f["name"] in keep_filters]

    def cluster(name: str, port: int, h2: bool = False) -> dict:
        options = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}} if h2 else {}
        return {"name": name, "type": "STATIC", "connect_timeout": "1s", **options, "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}]}}

    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [listener],
                                 "clusters": [cluster(contract.AUTHZ_CLUSTER, authz_port, h2=transport == "grpc"),
                                              cluster(contract.RELEASE_CLUSTER, authz_port),
                                              cluster("node", node_port)]}}


# --- the serving process ----------------------------------------------------------------------------------------
class ChatDecision:
    """What Authorizer.decide returns for an ordinary chat request, computed per request the same way."""

    async def check(self, peer, method, path, headers, body):
        from crosslogic.extauthz.decision import FORWARDED_HEADERS, Allowed

        token = headers.get("authorization", "")
        out = {contract.Header.ORG.value: "0b6e6e5c-org", contract.Header.ENV.value: "7d1f-env",
               contract.Header.KEY.value: token[-12:], contract.Header.MODEL.value: "llama-3-8b",
               contract.Header.REGION.value: "ap-south", contract.Header.ROUTE.value: "ap-south/llama-3-8b",
               contract.Header.USAGE_MODE.value: "json"}
        metadata = {"org_id": "0b6e6e5c-org", "env_id": "7d1f-env", "key_id": "k", "model": "llama-3-8b",
                    "region": "ap-south", "endpoint": "chat.completions", "streamed": False, "max_tokens": 1,
                    "prompt_estimate": 12, "reserve": "13"}
        ratelimit = {f"x-ratelimit-{kind}-{unit}": "1" for kind in ("limit", "remaining", "reset")
                     for unit in ("requests", "tokens")}
        remove = tuple(h for h in headers if h not in out and h not in FORWARDED_HEADERS and not h.startswith(":"))
        return Allowed(headers=out, remove=remove, metadata=metadata, response_headers=ratelimit)


async def _serve(http_port: int, grpc_port: int) -> None:
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    from crosslogic.extauthz.grpc_transport import AuthorizationServicer
    from crosslogic.extauthz.http_transport import authz_http_server
    from crosslogic.extauthz.http_wire import Limits
    from crosslogic.runtime.grpc_server import grpc_server

    checker = ChatDecision()
    servicer = AuthorizationServicer(checker)
    async with authz_http_server(f"127.0.0.1:{http_port}", checker, None, Limits()), grpc_server(
            f"127.0.0.1:{grpc_port}", lambda s: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
                servicer, s), "bench") as server:
        await server.wait_for_termination()


# --- the driver ---------------------------------------------------------------------------------------------------
def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def _envoy(tmp: Path, name: str, config: dict) -> tuple[subprocess.Popen, int]:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config))
    proc = _spawn([str(envoy_binary()), "-c", str(path), "--log-level", "error", "--concurrency", "2",
                   "--base-id", str(free_port())], tmp / f"{name}.log")
    port = config["static_resources"]["listeners"][0]["address"]["socketAddress"]["portValue"]
    wait_until(lambda: port_open("127.0.0.1", port), 30, f"envoy {name}", proc)
    return proc, port


def _cpu(proc: subprocess.Popen) -> float:
    times = psutil.Process(proc.pid).cpu_times()
    return times.user + times.system


async def _measure(args: argparse.Namespace, targets: dict[str, tuple[int, subprocess.Popen]],
                   authz: subprocess.Popen) -> None:
    body = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "Hello there"}],
                       "max_tokens": 1}).encode()
    names = list(targets)
    print(f"{'target':<24} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'ratio':>6} {'+p50 ms':>8} "
          f"{'authz CPU ms':>13} {'Envoy CPU ms':>13}")
    for concurrency in args.concurrency:
        runs: dict[str, list[LoadResult]] = {name: [] for name in names}
        cpu = {name: [0.0, 0.0] for name in names}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                port, envoy = targets[name]
                request = build_request("127.0.0.1", port, "/v1/chat/completions", body,
                                        {"authorization": "Bearer clsk_live_0123456789abcdef0123456789abcdef"})
                before = _cpu(authz), _cpu(envoy)
                runs[name].append(await run_load("127.0.0.1", port, request, concurrency, args.seconds))
                cpu[name][0] += _cpu(authz) - before[0]
                cpu[name][1] += _cpu(envoy) - before[1]
        print(f"-- concurrency {concurrency} ({args.rounds} rounds x {args.seconds:g} s, interleaved)")
        router = pooled(runs[names[0]])
        for name in names:
            result = pooled(runs[name])
            authz_ms = f"{1000 * cpu[name][0] / result.requests:.3f}" if name != names[0] else "-"
            print(f"{name:<24} {result.rps:>8.0f} {result.p50:>8.2f} {result.percentile(99):>8.2f} "
                  f"{result.errors:>7d} {result.rps / router.rps:>6.2f} {result.p50 - router.p50:>+8.2f} "
                  f"{authz_ms:>13} {1000 * cpu[name][1] / result.requests:>13.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--serve", nargs=2, type=int, metavar=("HTTP_PORT", "GRPC_PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_serve(*args.serve))
        return 0
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="clp-authz-transport-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            node_port, http_port, grpc_port = free_port(), free_port(), free_port()
            node = _spawn([sys.executable, "-m", "crosslogic.sim", "--port", str(node_port), "--model", "llama-3-8b"],
                          tmp / "node.log")
            authz = _spawn([sys.executable, __file__, "--serve", str(http_port), str(grpc_port)], tmp / "authz.log")
            procs += [node, authz]
            wait_until(lambda: port_open("127.0.0.1", node_port) and port_open("127.0.0.1", http_port)
                       and port_open("127.0.0.1", grpc_port), 30, "node and authz", authz)
            targets: dict[str, tuple[int, subprocess.Popen]] = {}
            for name, transport, keep in (("envoy router only", "http", ("envoy.filters.http.router",)),
                                          ("ext_authz over gRPC", "grpc", None), ("ext_authz over HTTP", "http", None)):
                keep = keep or ("envoy.filters.http.ext_authz", "envoy.filters.http.router")
                config = static_gateway_bootstrap(free_port(), grpc_port if transport == "grpc" else http_port,
                                                  node_port, free_port(), transport, keep_filters=keep)
                envoy, port = _envoy(tmp, name.replace(" ", "-"), config)
                procs.append(envoy)
                targets[name] = (port, envoy)
            asyncio.run(_measure(args, targets, authz))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
