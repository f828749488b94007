"""Part (a) of bench/scheduler.py: a node state change in Postgres -> applied by a real Envoy, at 10,000 endpoints.

The full path is measured: UPDATE nodes (one node drains) -> NOTIFY -> Scheduler rebuild (query + weights +
snapshot) -> ADS push -> Envoy applies the CLA (its `membership_healthy` gauge moves). The baseline is the
same path with 100 endpoints, in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg
import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from crosslogic.runtime.envoy import BootstrapParams, EnvoyProcess
from crosslogic.runtime.postgres import EmbeddedPostgres
from crosslogic.runtime.processes import free_port
from crosslogic.settings import SchedulerSettings
from crosslogic.store.db import migrate
from crosslogic.xds.cache import SnapshotCache
from crosslogic.xds.model import GatewaySettings
from crosslogic.xds.registry import load_pools
from crosslogic.xds.server import AggregatedDiscoveryServicer
from crosslogic.xds.service import Scheduler
from crosslogic.xds.snapshot import build_snapshot

CLUSTER = "bench/m"


def _gauge(admin: str, name: str) -> int | None:
    url = f"{admin}/stats?filter=^cluster\\.bench/m\\.{name}$"
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode().strip()
    return int(text.rpartition(": ")[2]) if text else None


async def _wait_gauge(admin: str, name: str, value: int, limit_s: float = 60.0) -> float:
    started = time.perf_counter()
    while _gauge(admin, name) != value:
        if time.perf_counter() - started > limit_s:
            raise TimeoutError(f"{name} never reached {value} (now {_gauge(admin, name)})")
        await asyncio.sleep(0.002)
    return time.perf_counter() - started


async def _add_nodes(conn: asyncpg.Connection, start: int, count: int) -> None:
    records = [(f"n{i:05d}", "bench", ["m"], f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", 8000)
               for i in range(start, start + count)]
    await conn.copy_records_to_table("nodes", records=records,
                                     columns=["name", "region", "model_list", "endpoint_host", "endpoint_port"])


async def _measure(conn: asyncpg.Connection, scheduler: Scheduler, admin: str, total: int, rounds: int) -> dict:
    await _wait_gauge(admin, "membership_total", total)
    await _wait_gauge(admin, "membership_healthy", total)
    rebuild = []
    for _ in range(rounds):
        started = time.perf_counter()
        pools = await load_pools(conn, scheduler.policy, scheduler.lifetimes)
        loaded = time.perf_counter()
        build_snapshot(pools, scheduler.gateway)
        rebuild.append((loaded - started, time.perf_counter() - loaded))
    end_to_end = []
    for i in range(rounds):
        await conn.execute("UPDATE nodes SET status = 'draining' WHERE name = $1", f"n{i:05d}")
        end_to_end.append(await _wait_gauge(admin, "membership_healthy", total - 1))
        await conn.execute("UPDATE nodes SET status = 'active' WHERE name = $1", f"n{i:05d}")
        await _wait_gauge(admin, "membership_healthy", total)
    return {"query_s": statistics.median(r[0] for r in rebuild), "build_s": statistics.median(r[1] for r in rebuild),
            "e2e_s": statistics.median(end_to_end), "e2e_max_s": max(end_to_end)}


async def run_push_bench(rounds: int = 5, big: int = 10_000, small: int = 100) -> list[tuple[int, dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        postgres = EmbeddedPostgres(Path(tmp) / "pg").start()
        envoy = None
        server = grpc.aio.server()
        try:
            await migrate(postgres.url)
            conn = await asyncpg.connect(postgres.url)
            await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('bench', 'Bench')")
            await conn.execute("INSERT INTO models (model_id) VALUES ('m')")
            await _add_nodes(conn, 0, small)
            pool = await asyncpg.create_pool(postgres.url, min_size=1, max_size=4)
            cache = SnapshotCache()
            scheduler = Scheduler(pool, cache, GatewaySettings(listen_port=free_port()), SchedulerSettings())
            watcher = asyncio.create_task(scheduler.run(postgres.url))
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AggregatedDiscoveryServicer(cache), server)
            xds_port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            admin_port = free_port()
            envoy = await asyncio.to_thread(EnvoyProcess(Path(tmp) / "envoy", BootstrapParams(
                node_id="bench", admin_port=admin_port, xds_port=xds_port, authz_port=free_port(),
                accounting_port=free_port(), api_port=free_port(), ratelimit_port=free_port())).start)
            admin = f"http://127.0.0.1:{admin_port}"
            results = [(small, await _measure(conn, scheduler, admin, small, rounds))]
            await _add_nodes(conn, small, big - small)
            results.append((big, await _measure(conn, scheduler, admin, big, rounds)))
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await pool.close()
            await conn.close()
            return results
        finally:
            await server.stop(0)
            if envoy is not None:
                envoy.stop()
            postgres.stop()
