"""What failed-request spam costs ext_authz, without and with the per-address failure budget (issue 9, item 12).

    .venv/bin/python bench/abuse.py [--seconds 5] [--concurrency 16]

Two `crosslogic up --demo` stacks in turn: the baseline with the budget off (CROSSLOGIC_ABUSE_FAILURE_BURST=0),
then the defaults. Each takes two floods from one address: API keys that look real and change every request
(each one an HMAC, a Redis and a Postgres lookup), and the demo key with a 256 KiB body that is JSON until
its last byte (a full parse, then a 400). Printed: requests/s, ext_authz and Envoy CPU per request, and the
ratio of ext_authz CPU per request with the budget to without.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_per_request import cpu_by_role  # noqa: E402
from bench.gateway_overhead import start_stack  # noqa: E402
from bench.loadgen import _read_response, build_request  # noqa: E402
from crosslogic.runtime.processes import free_port  # noqa: E402


async def _flood(port: int, requests: list[bytes], concurrency: int, seconds: float) -> collections.Counter:
    statuses: collections.Counter = collections.Counter()
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                while time.perf_counter() < deadline:
                    writer.write(requests[i % len(requests)])
                    statuses[await _read_response(reader)] += 1
                    i += concurrency
            except (asyncio.IncompleteReadError, ConnectionError):
                statuses["closed"] += 1  # Envoy closes the connection after some refusals: open another
            finally:
                writer.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return statuses


def _floods(port: int, api_key: str) -> dict[str, list[bytes]]:
    chat = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}]}).encode()
    rotating = [build_request("127.0.0.1", port, "/v1/chat/completions", chat,
                              {"authorization": f"Bearer clsk_live_{secrets.token_hex(16)}"}) for _ in range(20_000)]
    almost_json = b'{"model": "llama-3-8b", "messages": [' + b'"aaaaaaaaaaaaaa", ' * 14_000 + b"1}"
    bad_body = [build_request("127.0.0.1", port, "/v1/chat/completions", almost_json,
                              {"authorization": f"Bearer {api_key}"})]
    return {"rotating bad keys": rotating, "256 KiB bad JSON, real key": bad_body}


def _run(label: str, env: dict[str, str], seconds: float, concurrency: int) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="clp-abuse-") as tmp:
        stack, info = start_stack(Path(tmp), free_port(), env={**os.environ, **env})
        try:
            port = int(info["gateway_base"].rsplit(":", 1)[1])
            for name, requests in _floods(port, info["api_key"]).items():
                before = cpu_by_role(stack.pid)
                start = time.perf_counter()
                statuses = asyncio.run(_flood(port, requests, concurrency, seconds))
                elapsed = time.perf_counter() - start
                after = cpu_by_role(stack.pid)
                total = sum(statuses.values())
                results[name] = {
                    "rps": total / elapsed, "statuses": dict(statuses),
                    **{role: 1000 * (after.get(role, 0.0) - before.get(role, 0.0)) / total
                       for role in ("authz", "envoy")}}
                line = results[name]
                print(f"[{label}] {name}: {line['rps']:.0f} req/s, ext_authz {line['authz']:.3f} ms CPU/req, "
                      f"envoy {line['envoy']:.3f} ms CPU/req, statuses {line['statuses']}", flush=True)
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(60)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    baseline = _run("budget off", {"CROSSLOGIC_ABUSE_FAILURE_BURST": "0"}, args.seconds, args.concurrency)
    budget = _run("budget on", {}, args.seconds, args.concurrency)
    for name in baseline:
        print(f"{name}: ext_authz CPU per request {budget[name]['authz'] / baseline[name]['authz']:.2f}x, "
              f"requests/s {budget[name]['rps'] / baseline[name]['rps']:.2f}x with the budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
