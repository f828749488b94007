"""What observing an ext_authz check costs: `ObservedChecker` (request-id log context, counters, the check
histogram, a span when tracing is on) around a decision that costs nothing, against that decision alone; and
what the accounting service's per-record counters (`accounting/metrics.record_finished`) cost per usage record.

    .venv/bin/python bench/observe_overhead.py [--checks 200000] [--rounds 3]

Interleaved rounds in one process (uvloop, as `serve authz` runs); CPU time per check. The difference is the
whole per-request cost of the observability layer in ext_authz; compare it with ext_authz's CPU per request
and the accounting service's (bench/cpu_per_request.py, README "Benchmarks").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datetime import UTC, datetime  # noqa: E402

from crosslogic.accounting.metrics import record_finished  # noqa: E402
from crosslogic.contract import REQUEST_ID_HEADER, AuthzMeta  # noqa: E402
from crosslogic.extauthz.decision import Allowed  # noqa: E402
from crosslogic.extauthz.observe import ObservedChecker  # noqa: E402
from crosslogic.usage_record import UsageRecord  # noqa: E402

ALLOWED = Allowed(headers={}, remove=(), metadata={AuthzMeta.REGION: "ap-south", AuthzMeta.MODEL: "llama-3-8b"})
HEADERS = {REQUEST_ID_HEADER: "6c1f0e1e-1d7b-4c63-9d55-0c8f1f7a3c11", "authorization": "Bearer x"}


class FreeDecision:
    async def check(self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes) -> Allowed:
        return ALLOWED


async def _per_check_us(checker, checks: int) -> float:
    started = time.process_time()
    for _ in range(checks):
        await checker.check("127.0.0.1", "POST", "/v1/chat/completions", HEADERS, b"")
    return (time.process_time() - started) / checks * 1e6


async def main(checks: int, rounds: int) -> None:
    bare, observed = FreeDecision(), ObservedChecker(FreeDecision())
    results: dict[str, list[float]] = {"bare": [], "observed": []}
    for _ in range(rounds):
        results["bare"].append(await _per_check_us(bare, checks))
        results["observed"].append(await _per_check_us(observed, checks))
    best = {name: min(values) for name, values in results.items()}
    print(f"ext_authz: decision alone: {best['bare']:.2f} us CPU/check; observed: {best['observed']:.2f} us CPU/check; "
          f"observability costs {best['observed'] - best['bare']:.2f} us/check (best of {rounds} rounds)")
    record = UsageRecord("rid", datetime.now(UTC), "o", "e", "k", "ap-south", "llama-3-8b", "chat.completions",
                         False, 200, 30, 200, "reported", 850, "10.0.0.5:8000")
    per_record = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(checks):
            record_finished(record)
        per_record.append((time.process_time() - started) / checks * 1e6)
    print(f"accounting: per-pool counters cost {min(per_record):.2f} us CPU/usage record (best of {rounds} rounds)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args.checks, args.rounds))
    else:
        uvloop.run(main(args.checks, args.rounds))
