"""CPU time per request of every process of one `crosslogic up --demo` stack, under a closed-loop load.

    .venv/bin/python bench/cpu_per_request.py [--seconds 6] [--concurrency 16]

Attribution is by process tree of this stack only (other stacks on the machine are not counted), so it
shows which hop bounds the gateway: CPU milliseconds of each process over the run / requests served.
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

from bench.gateway_overhead import start_stack  # noqa: E402
from bench.loadgen import build_request, run_load  # noqa: E402
from crosslogic.runtime.processes import free_port  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clp-cpu-") as tmp:
        stack, info = start_stack(Path(tmp), free_port())
        try:
            port, request = one_token_chat(info)
            asyncio.run(run_load("127.0.0.1", port, request, args.concurrency, 2, warmup_s=0))  # warm caches
            before, own_before = cpu_by_role(stack.pid), time.process_time()
            result = asyncio.run(run_load("127.0.0.1", port, request, args.concurrency, args.seconds, warmup_s=0))
            after, own_after = cpu_by_role(stack.pid), time.process_time()
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(60)
    print(f"{result.requests} requests, {result.rps:.0f} req/s, {result.errors} errors")
    for role in sorted(after):
        print(f"{role:<14} {1000 * (after[role] - before.get(role, 0.0)) / result.requests:.3f} ms CPU/request")
    print(f"{'load generator':<14} {1000 * (own_after - own_before) / result.requests:.3f} ms CPU/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
