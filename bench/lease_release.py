"""What concurrency leases cost, and freeing them as each response ends (usage.lua -> ext_authz POST /release).

    .venv/bin/python bench/lease_release.py [--seconds 5] [--concurrency 1 16] [--rounds 2]

One `crosslogic up --demo` stack; the demo plan's limits lifted. Phases alternate in the same process tree, each
with another concurrency limit on the plan: "far" (100,000: every request takes leases, none reaches half the
limit, so settlement frees them and no release call is made), "near" (twice the load's concurrency: most leases
leave the set at least half full, so the Lua filter calls /release as their response ends; reserve.lua says why
half) and "none" (no limit, no lease). Prints throughput, p50 latency and CPU per request of each process (ms),
and the ratios to "none".
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_per_request import cpu_by_role, one_token_chat  # noqa: E402
from bench.gateway_overhead import start_stack  # noqa: E402
from bench.loadgen import run_load  # noqa: E402
from crosslogic.runtime.processes import free_port  # noqa: E402

ROLES = ("envoy", "authz", "accounting", "valkey")


async def _set_plan_concurrency(database_url: str, limit: int | None) -> None:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:  # the statement trigger notifies ext_authz, which drops its cached limits
        await conn.execute("UPDATE plan_limits SET concurrency_limit = $1 WHERE billing_plan = 'serverless'", limit)
    finally:
        await conn.close()


def _phase(stack_pid: int, port: int, request: bytes, concurrency: int, seconds: float) -> dict:
    before = cpu_by_role(stack_pid)
    result = asyncio.run(run_load("127.0.0.1", port, request, concurrency, seconds, warmup_s=0.5))
    after = cpu_by_role(stack_pid)
    cpu = {role: 1000 * (after.get(role, 0.0) - before.get(role, 0.0)) / max(1, result.requests) for role in ROLES}
    return {"rps": result.rps, "p50": result.p50, "errors": result.errors, **cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clp-release-") as tmp:
        stack, info = start_stack(Path(tmp), free_port())
        try:
            port, request = one_token_chat(info)
            asyncio.run(run_load("127.0.0.1", port, request, 4, 2, warmup_s=0))  # warm caches
            results: dict[tuple[int, str], list[dict]] = {}
            for concurrency in args.concurrency:
                for _ in range(args.rounds):
                    for name, limit in (("far: leases, no call", 100_000), ("near: leases + release", 2 * concurrency),
                                        ("none: no lease", None)):
                        asyncio.run(_set_plan_concurrency(info["database_url"], limit))
                        time.sleep(0.5)  # the NOTIFY reaches ext_authz
                        results.setdefault((concurrency, name), []).append(
                            _phase(stack.pid, port, request, concurrency, args.seconds))
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(60)
    header = f"{'concurrency / phase':<26} {'req/s':>8} {'p50 ms':>8} " + " ".join(f"{r:>10}" for r in ROLES)
    print(header + "   (CPU ms per request)")
    for (concurrency, name), runs in results.items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        print(f"{concurrency:>3} {name:<22} {mean['rps']:>8.0f} {mean['p50']:>8.2f} "
              + " ".join(f"{mean[r]:>10.3f}" for r in ROLES) + f"   errors {sum(r['errors'] for r in runs)}")
    for concurrency in args.concurrency:
        none = results[(concurrency, "none: no lease")]
        for name in ("far: leases, no call", "near: leases + release"):
            runs = results[(concurrency, name)]
            ratio = (sum(r["rps"] for r in runs) / len(runs)) / (sum(r["rps"] for r in none) / len(none))
            extra = sum(r["p50"] for r in runs) / len(runs) - sum(r["p50"] for r in none) / len(none)
            print(f"concurrency {concurrency}, {name}: throughput / no lease = {ratio:.3f}, p50 {extra:+.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
