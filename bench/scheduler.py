"""Scheduler benchmarks. Run: python bench/scheduler.py [--skip-ttft] [--skip-push]

(a) 10,000 endpoints: node state change in Postgres -> Envoy applied it (vs 100 endpoints, same run).
(b) heterogeneous simulated nodes: TTFT p50/p99 with load-aware weights vs static equal weights, same run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from scheduler_push import run_push_bench  # noqa: E402
from scheduler_ttft import run_ttft_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-push", action="store_true")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    if not args.skip_push:
        results = asyncio.run(run_push_bench())
        print("(a) node drains in Postgres -> applied by Envoy (median of 5; max)")
        base = results[0][1]["e2e_s"]
        for count, r in results:
            print(f"  {count:>6} endpoints: query+weights {r['query_s'] * 1000:7.1f} ms, snapshot build "
                  f"{r['build_s'] * 1000:7.1f} ms, end to end {r['e2e_s'] * 1000:7.1f} ms "
                  f"(max {r['e2e_max_s'] * 1000:.1f} ms; {r['e2e_s'] / base:.1f}x the 100-endpoint time)")
    if not args.skip_ttft:
        rows = asyncio.run(run_ttft_bench(args.requests))
        print("(b) time to first token through the gateway, heterogeneous nodes")
        base = rows["static equal weights"]
        for name, r in rows.items():
            print(f"  {name:<22} p50 {r['p50'] * 1000:7.1f} ms  p99 {r['p99'] * 1000:7.1f} ms  "
                  f"(p50 {r['p50'] / base['p50']:.2f}x, p99 {r['p99'] / base['p99']:.2f}x the static run); "
                  f"share to the fast node {r['fast_share']:.0%}")


if __name__ == "__main__":
    main()
