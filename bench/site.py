"""Site gateway vs cloud gateway: what a request costs at an on-prem site (its own Envoy, the site process's local
ext_authz on synced views, the usage spool) against the cloud's full chain, same machine, same simulated nodes.

    .venv/bin/python bench/site.py [--seconds 5] [--rounds 2] [--concurrency 1 16]

One run starts `crosslogic up --demo` (the cloud, with its two simulated nodes), creates an org with a key and a
site (`crosslogic site create`, `bundle create`), starts the site from its bundle (`crosslogic site up`) with two
simulated nodes and their agents, and measures in interleaved rounds with the same closed-loop load generator:
a simulated node directly (baseline), the cloud gateway, and the site gateway. Only the ratios are meaningful
across machines. The site's usage reaches the cloud ledger in the background (checked at the end).
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_overhead import pooled, start_stack  # noqa: E402
from bench.loadgen import LoadResult, build_request, run_load  # noqa: E402
from crosslogic.runtime.processes import free_port, port_open, wait_until  # noqa: E402

MODEL, REGION = "llama-3-8b", "ap-south"


def _cli(state: Path, *argv: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "crosslogic", "--state-dir", str(state), "--json", *argv],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def _free_block(size: int) -> int:
    while True:
        base = free_port()
        if base + size < 65535 and not any(port_open("127.0.0.1", base + i) for i in range(1, size)):
            return base


async def _tenant(info: dict, state: Path) -> tuple[str, str]:
    import asyncpg

    from crosslogic.store import tenancy as t

    secret = (state / "key_secret").read_text().strip().encode()
    conn = await asyncpg.connect(info["database_url"])
    try:
        org = await t.create_org(conn, "bench-site-org", "serverless", [REGION])
        env = await t.create_env(conn, org.org_id, "prod", REGION)
        _, key = await t.create_key(conn, secret, org.org_id, env.env_id, "bench")
    finally:
        await conn.close()
    return org.org_id, key


def start_site(state: Path, work: Path, org_id: str, procs: list[subprocess.Popen]) -> tuple[int, dict]:
    gateway_port = free_port()
    _cli(state, "site", "create", "--org", org_id, "--name", "bench-site", "--listen", f"127.0.0.1:{gateway_port}")
    bundle = work / "bench-site.tar.gz"
    _cli(state, "bundle", "create", "--site", "bench-site", "--out", str(bundle), "--local-ports",
         str(_free_block(4)))
    ready = work / "site.ready.json"
    procs.append(subprocess.Popen([sys.executable, "-m", "crosslogic", "site", "up", str(bundle), "--dir",
                                   str(work / "site"), "--ready-file", str(ready)],
                                  stdout=open(work / "site-up.log", "wb"), stderr=subprocess.STDOUT))
    wait_until(ready.exists, 120, "crosslogic site up", procs[-1])
    config = json.loads((work / "site" / "site.json").read_text())
    for index in range(2):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "crosslogic.sim", "--port", str(port), "--node-name",
                                       f"bench-site-node-{index}", "--model", MODEL], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "crosslogic", "agent", "--control-plane", config["cloud_xds_address"],
             "--tls-dir", str(work / "site" / "tls"), "--reserved-org", org_id, "--cloud", "onprem",
             "--name", f"bench-site-node-{index}", "--region", REGION, "--model", MODEL,
             "--advertise", f"127.0.0.1:{port}", "--warmup-requests", "0"],
            stdout=subprocess.DEVNULL, stderr=open(work / f"agent-{index}.log", "wb")))
    return gateway_port, json.loads(ready.read_text())


async def _wait_serving(port: int, key: str) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    request = build_request("127.0.0.1", port, "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = await run_load("127.0.0.1", port, request, 1, 0.3, warmup_s=0)
        if result.requests and not result.errors:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the site gateway never served")


async def measure(args: argparse.Namespace, info: dict, site_port: int, site_key: str) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}],
                       "max_tokens": 1}).encode()
    node_port = int(info["demo_nodes"][0]["url"].rsplit(":", 1)[1])
    cloud_port = int(info["gateway_base"].rsplit(":", 1)[1])
    targets = {
        "node directly": (node_port, build_request("127.0.0.1", node_port, "/v1/chat/completions", body, {})),
        "cloud gateway": (cloud_port, build_request("127.0.0.1", cloud_port, "/v1/chat/completions", body,
                                                    {"authorization": f"Bearer {info['api_key']}"})),
        "site gateway": (site_port, build_request("127.0.0.1", site_port, "/v1/chat/completions", body,
                                                  {"authorization": f"Bearer {site_key}"})),
    }
    names = list(targets)
    print(f"{'target':<16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'p50 / cloud':>12} "
          f"{'+p50 ms vs node':>16}")
    for concurrency in args.concurrency:
        runs: dict[str, list[LoadResult]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                port, request = targets[name]
                runs[name].append(await run_load("127.0.0.1", port, request, concurrency, args.seconds))
        print(f"-- concurrency {concurrency} ({args.rounds} rounds x {args.seconds:g} s, interleaved)")
        node, cloud = pooled(runs["node directly"]), pooled(runs["cloud gateway"])
        for name in names:
            result = pooled(runs[name])
            print(f"{name:<16} {result.rps:>8.0f} {result.p50:>8.2f} {result.percentile(99):>8.2f} "
                  f"{result.errors:>7d} {result.p50 / cloud.p50:>12.2f} {result.p50 - node.p50:>+16.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per target and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-site-") as tmp:
        work = Path(tmp)
        state = work / "cloud"
        state.mkdir()
        cloud, info = start_stack(state, free_port(), {**os.environ})
        procs.append(cloud)
        try:
            org_id, key = asyncio.run(_tenant(info, state))
            site_port, _ = start_site(state, work, org_id, procs)
            asyncio.run(_wait_serving(site_port, key))
            asyncio.run(measure(args, info, site_port, key))
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
