"""The xDS process: watch routing state in Postgres, rebuild snapshots, serve ADS to every Envoy."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from crosslogic.xds.cache import SnapshotCache
from crosslogic.xds.model import GatewaySettings
from crosslogic.xds.registry import load_pools
from crosslogic.xds.server import AggregatedDiscoveryServicer
from crosslogic.xds.snapshot import build_snapshot

log = logging.getLogger("crosslogic.xds")
ROUTING_CHANNEL = "crosslogic_routing"
# Safety net: rebuild now and then even without a notification (e.g. a missed NOTIFY during a reconnect).
RESYNC_INTERVAL_S = 10.0
# Coalesce bursts of changes (a batch of node updates) into one push.
DEBOUNCE_S = 0.05


async def _rebuild(database_url: str, cache: SnapshotCache, gateway: GatewaySettings) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        pools = await load_pools(conn)
    finally:
        await conn.close()
    if cache.set(build_snapshot(pools, gateway)):
        log.info("pushed snapshot: %d pools", len(pools))


async def watch_routing_state(database_url: str, cache: SnapshotCache, gateway: GatewaySettings) -> None:
    changed = asyncio.Event()
    changed.set()
    while True:
        try:
            listener = await asyncpg.connect(database_url)
            await listener.add_listener(ROUTING_CHANNEL, lambda *_: changed.set())
            try:
                changed.set()  # state may have moved while we were disconnected
                while not listener.is_closed():
                    try:
                        await asyncio.wait_for(changed.wait(), RESYNC_INTERVAL_S)
                    except TimeoutError:
                        pass
                    await asyncio.sleep(DEBOUNCE_S)
                    changed.clear()
                    await _rebuild(database_url, cache, gateway)
            finally:
                await listener.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("routing state unavailable (%s); keeping the last snapshot", exc)
            await asyncio.sleep(1.0)


async def serve_xds(database_url: str, listen: str, gateway: GatewaySettings) -> None:
    cache = SnapshotCache()
    watcher = asyncio.create_task(watch_routing_state(database_url, cache, gateway))
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AggregatedDiscoveryServicer(cache), server)
    server.add_insecure_port(listen)
    await server.start()
    log.info("xDS listening on %s", listen)
    try:
        await server.wait_for_termination()
    finally:
        watcher.cancel()
        await server.stop(1)
