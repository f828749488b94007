"""CPU time per request of every process of one `crosslogic up --demo` stack, under a closed-loop load.

    .venv/bin/python bench/cpu_per_request.py [--seconds 6] [--concurrency 16] [--transports http grpc]
                                              [--baseline-src DIR] [--rounds 1]

Attribution is by process tree of this stack only (other stacks on the machine are not counted), so it
shows which hop bounds the gateway: CPU milliseconds of each process over the run / requests served. With
several ext_authz transports (CROSSLOGIC_AUTHZ_TRANSPORT), one stack each, measured one after the other, and one
column each. `--baseline-src DIR` (a checkout of another commit: `git worktree add --detach DIR <commit>`) also
measures each transport on that commit's package, alternating with this one (`--rounds` times each), for a
before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_overhead import start_stack, transport_env  # noqa: E402
from bench.loadgen import build_request, run_load  # noqa: E402
from crosslogic.runtime.processes import free_port  # noqa: E402
from crosslogic.settings import AUTHZ_TRANSPORTS, Settings  # noqa: E402


def _role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "_bin/envoy" in text:
        return "envoy"
    if "crosslogic.sim" in text:
        return "simulator"
    if "valkey-server" in text:
        return "valkey"
    if "postgres" in text:
        return "postgres"
    if " serve " in f" {text} ":
        return text.split(" serve ", 1)[1].split()[0]
    return "supervisor"


def cpu_by_role(root_pid: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            times = proc.cpu_times()
            role = _role(proc.cmdline())
        except psutil.Error:
            continue
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def one_token_chat(info: dict) -> tuple[int, bytes]:
    """(gateway port, raw HTTP request) of a one-token chat completion with the demo key of a started stack."""
    port = int(info["gateway_base"].rsplit(":", 1)[1])
    body = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "Hello there"}],
                       "max_tokens": 1}).encode()
    return port, build_request("127.0.0.1", port, "/v1/chat/completions", body,
                               {"authorization": f"Bearer {info['api_key']}"})


def measure(transport: str, seconds: float, concurrency: int, source: Path | None = None
            ) -> tuple[str, dict[str, float]]:
    """One stack on `transport` (of the package in `source`, else this one): (summary line, CPU ms per request
    by role, the load generator included)."""
    with tempfile.TemporaryDirectory(prefix="clp-cpu-") as tmp:
        stack, info = start_stack(Path(tmp), free_port(), transport_env(transport, source))
        try:
            port, request = one_token_chat(info)
            asyncio.run(run_load("127.0.0.1", port, request, concurrency, 2, warmup_s=0))  # warm caches
            before, own_before = cpu_by_role(stack.pid), time.process_time()
            result = asyncio.run(run_load("127.0.0.1", port, request, concurrency, seconds, warmup_s=0))
            after, own_after = cpu_by_role(stack.pid), time.process_time()
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(60)
    per_request = {role: 1000 * (after[role] - before.get(role, 0.0)) / result.requests for role in after}
    per_request["load generator"] = 1000 * (own_after - own_before) / result.requests
    return f"{transport}: {result.requests} requests, {result.rps:.0f} req/s, {result.errors} errors", per_request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--transports", nargs="+", choices=AUTHZ_TRANSPORTS, default=[Settings().authz_transport])
    parser.add_argument("--baseline-src", type=Path, help="a checkout of another commit: each transport is also "
                        "measured on it, alternating with this one (column '<transport>@base')")
    parser.add_argument("--rounds", type=int, default=1, help="stacks measured this many times each, alternating; "
                        "the columns pool them")
    args = parser.parse_args()
    runs = [(t, None) for t in args.transports]
    if args.baseline_src:
        runs = [run for t in args.transports for run in ((t + "@base", args.baseline_src.resolve()), (t, None))]
    totals: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name, source in runs:
            line, column = measure(name.split("@")[0], args.seconds, args.concurrency, source)
            print(f"{name} {line}")
            for role, value in column.items():
                totals.setdefault(name, {})[role] = totals.get(name, {}).get(role, 0.0) + value / args.rounds
    columns = totals
    roles = sorted({role for column in columns.values() for role in column} - {"load generator"}) + ["load generator"]
    print(f"{'ms CPU/request':<16}" + "".join(f"{t:>10}" for t in columns))
    for role in roles:
        print(f"{role:<16}" + "".join(f"{column.get(role, 0.0):>10.3f}" for column in columns.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
