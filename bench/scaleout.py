"""Scale-out on one box: throughput with 1 vs 2 ext_authz replicas and 1 vs 2 Envoys, and the CPU per request of
every tier (what docs/deploy.md's sizing table is built from).

    .venv/bin/python bench/scaleout.py [--seconds 6] [--concurrency 32]

Each configuration is its own `crosslogic up --demo --replicas A --envoys E` stack, driven by the same closed-loop
generator (one-token chat completions, limits lifted); ratios are against the 1 x 1 stack of the same run. On a
machine with fewer cores than processes the replicas share the cores, so the ratios show whether a tier's
replicas add capacity where there is CPU to spare, not the scaling of a cluster; the per-tier CPU per request is
what carries over (capacity per core = 1000 / ms).
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

from bench.cpu_per_request import cpu_by_role, one_token_chat  # noqa: E402
from bench.gateway_overhead import _lift_plan_limits  # noqa: E402
from bench.loadgen import run_load  # noqa: E402
from crosslogic.runtime.processes import free_port, wait_until  # noqa: E402

CONFIGURATIONS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (replicas of every service, Envoys)


def start(state: Path, replicas: int, envoys: int) -> tuple[subprocess.Popen, dict]:
    ready = state / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "crosslogic", "--state-dir", str(state), "up", "--demo",
                             "--port", str(free_port()), "--ready-file", str(ready), "--replicas", str(replicas),
                             "--envoys", str(envoys)],
                            stdout=open(state / "up.log", "wb"), stderr=subprocess.STDOUT, env=dict(os.environ))
    wait_until(ready.exists, 180, "crosslogic up", proc)
    info = json.loads(ready.read_text())
    asyncio.run(_lift_plan_limits(info["database_url"]))
    return proc, info


def measure(replicas: int, envoys: int, seconds: float, concurrency: int) -> tuple[float, int, dict[str, float]]:
    """(requests/s, errors, CPU ms per request by tier) of one configuration."""
    with tempfile.TemporaryDirectory(prefix="clp-scale-") as tmp:
        stack, info = start(Path(tmp), replicas, envoys)
        try:
            port, request = one_token_chat(info)
            asyncio.run(run_load("127.0.0.1", port, request, concurrency, 2, warmup_s=0))  # caches, connections
            before = cpu_by_role(stack.pid)
            result = asyncio.run(run_load("127.0.0.1", port, request, concurrency, seconds, warmup_s=0))
            after = cpu_by_role(stack.pid)
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(60)
    requests = max(1, result.requests)
    return result.rps, result.errors, {role: 1000 * (after[role] - before.get(role, 0.0)) / requests for role in after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}")
    results = {}
    for replicas, envoys in CONFIGURATIONS:
        started = time.monotonic()
        results[(replicas, envoys)] = measure(replicas, envoys, args.seconds, args.concurrency)
        rps, errors, _ = results[(replicas, envoys)]
        print(f"replicas {replicas}, envoys {envoys}: {rps:.0f} req/s, {errors} errors "
              f"({time.monotonic() - started:.0f}s with start-up)")
    base = results[(1, 1)][0]
    print(f"\n{'replicas x envoys':<20}{'req/s':>8}{'ratio':>8}")
    for (replicas, envoys), (rps, _, _) in results.items():
        print(f"{f'{replicas} x {envoys}':<20}{rps:>8.0f}{rps / base:>8.2f}")
    cpu = results[(1, 1)][2]
    print(f"\n{'tier (1 x 1)':<16}{'ms CPU/req':>12}{'req/s per core':>16}")
    for role in sorted(cpu, key=lambda r: -cpu[r]):
        if cpu[role] > 0.001:
            print(f"{role:<16}{cpu[role]:>12.3f}{1000 / cpu[role]:>16.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
