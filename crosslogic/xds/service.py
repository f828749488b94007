"""The xDS process: watch routing state in Postgres, rebuild snapshots, serve ADS to every Envoy, and serve
the NodeAgent API to node agents (one process: a registration or a drain reaches Envoy without a hop)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
from envoy.service.discovery.v3 import ads_pb2_grpc

from crosslogic.contract import ROUTING_CHANNEL
from crosslogic.runtime import internal_tls
from crosslogic.runtime.grpc_server import grpc_server
from crosslogic.runtime.ops_http import ops_server
from crosslogic.runtime.readiness import Readiness, postgres_check
from crosslogic.settings import SchedulerSettings, Settings
from crosslogic.store.db import POSTGRES_UNAVAILABLE, follow_notifications
from crosslogic.xds import metrics, node_registry, sites
from crosslogic.xds.cache import SiteCaches, SnapshotCache
from crosslogic.xds.identity import IdentityRefused, site_identity
from crosslogic.xds.model import GatewaySettings, client_bounds
from crosslogic.xds.nodeagent import NodeAgentServicer, add_to_server, server_credentials
from crosslogic.xds.policy import PolicyRejected, RoutingPolicy, load_policy, record_status
from crosslogic.xds.registry import cloud_pools, load_nodes
from crosslogic.xds.server import AggregatedDiscoveryServicer, StreamRefused
from crosslogic.xds.snapshot import build_snapshot

log = logging.getLogger("crosslogic.xds")
# Coalesce bursts of changes (a batch of node updates) into one push.
DEBOUNCE_S = 0.05


class Scheduler:
    """Owns the last accepted routing policy; turns registry state into snapshots."""

    def __init__(self, pool: asyncpg.Pool, cache: SnapshotCache, gateway: GatewaySettings,
                 settings: SchedulerSettings) -> None:
        self.pool = pool
        self.cache = cache
        self.gateway = gateway
        self.lifetimes = node_registry.Lifetimes(settings.heartbeat_timeout_s, settings.dead_after_s,
                                                 settings.drain_ttl_s, settings.remove_after_s)
        self.tick_s = settings.tick_s
        self.policy: RoutingPolicy | None = None
        self._policy_message = ""
        self.changed = asyncio.Event()
        self.nodes = metrics.NodeObserver()
        self.site_caches = SiteCaches()

    async def _refresh_policy(self, conn: asyncpg.Connection) -> None:
        try:
            policy = await load_policy(conn)
            accepted, message = True, "routing policy accepted"
        except PolicyRejected as exc:
            policy, accepted, message = None, False, str(exc)
        if message != self._policy_message:
            kept = "" if accepted or self.policy is None else "; keeping the last good one"
            (log.info if accepted else log.error)("%s%s", message, kept)
            await record_status(conn, accepted, message)
            self._policy_message = message
        metrics.policy_rejected.set(0 if accepted else 1)
        if policy is not None:
            self.policy = policy

    async def rebuild(self) -> None:
        started = time.perf_counter()
        async with self.pool.acquire() as conn:
            await node_registry.sweep(conn, self.lifetimes)
            await self.nodes.read(conn)
            await self._refresh_policy(conn)
            if self.policy is None:
                return  # no valid policy yet: Envoy waits rather than receiving a bad one
            nodes, models = await load_nodes(conn, self.lifetimes)
            site_rows, admitted = await sites.load_sites(conn)
        pools = cloud_pools(nodes, self.policy, models)
        self.nodes.observe_pools(pools)
        if self.cache.set(build_snapshot(pools, self.gateway)):
            metrics.snapshots.inc()
            log.info("pushed snapshot: %d pools", len(pools))
        # Per-identity snapshots (xds/sites.py); a revoked or expired certificate's streams end here.
        snapshots = {site.site_id: sites.site_snapshot(site, nodes, self.policy, models, self.gateway)
                     for site in site_rows}
        if self.site_caches.update(snapshots, admitted):
            metrics.snapshots.inc()
        metrics.rebuild_seconds.observe(time.perf_counter() - started)

    async def run(self, database_url: str) -> None:
        """Rebuild on every NOTIFY (debounced) and on every tick (liveness, weights, certificate expiry); forever.

        The change feed is the shared LISTEN helper (store/db.follow_notifications: reconnects, and a reconnect
        triggers a rebuild since changes made meanwhile were missed); ticks go on while it is down."""
        feed = asyncio.create_task(follow_notifications(
            database_url, [ROUTING_CHANNEL], lambda _channel, _payload: self.changed.set(), self.changed.set,
            "routing change feed"))
        self.changed.set()
        try:
            while True:
                try:
                    await asyncio.wait_for(self.changed.wait(), self.tick_s)
                    await asyncio.sleep(DEBOUNCE_S)
                except TimeoutError:
                    pass
                self.changed.clear()
                try:
                    await self.rebuild()
                except POSTGRES_UNAVAILABLE as exc:
                    metrics.rebuild_failures.inc()
                    log.warning("routing state unavailable (%s); keeping the last snapshot", exc)
                    await asyncio.sleep(1.0)
        finally:
            feed.cancel()
            await asyncio.gather(feed, return_exceptions=True)


def readiness(pool: asyncpg.Pool, cache: SnapshotCache, ads: AggregatedDiscoveryServicer) -> Readiness:
    """Ready = Postgres answers and a snapshot is built (a valid policy was read and turned into resources).

    Connected Envoys are reported, not required: Envoy starts after the control plane (it needs xDS for its
    listener), and an xDS replica that waited for an Envoy before calling itself ready would never be sent one.
    """

    async def snapshot() -> str:
        if cache.snapshot is None:
            raise RuntimeError("no snapshot built yet (no valid routing policy read)")
        return f"built; {ads.open_streams} Envoy ADS stream(s) connected"

    return Readiness().add("postgres", postgres_check(pool)).add("snapshot", snapshot)


def gateway_settings(settings: Settings, host: str, port: int, admission: str | None = None,
                     transport: str | None = None) -> GatewaySettings:
    """The gateway's settings, built in one place from the process settings (a site's listener derives its own
    from these, xds/sites.site_gateway)."""
    return GatewaySettings(listen_host=host, listen_port=port, max_request_bytes=settings.max_request_bytes,
                           usage_log_path=settings.usage_log_path, tls_cert_path=settings.gateway_tls_cert,
                           tls_key_path=settings.gateway_tls_key, admission=admission or settings.admission,
                           authz_transport=transport or settings.authz_transport,
                           trace_sample_percent=settings.trace_sample_percent if settings.otlp_endpoint else 0.0,
                           **client_bounds(settings))


def site_resolver(pool: asyncpg.Pool, scheduler: Scheduler):
    """The site listener's ADS streams: each reads the cache of its verified, still admitted site identity."""

    async def resolve(context) -> SnapshotCache:
        try:
            identity = await site_identity(context, pool)
        except IdentityRefused as exc:
            raise StreamRefused(str(exc)) from None
        cache = scheduler.site_caches.cache_for(identity.cache_key, identity.site_id)
        if cache.snapshot is None:
            scheduler.changed.set()  # a site created after the last rebuild: build its snapshot now
        return cache

    return resolve


async def serve_xds(database_url: str, listen: str, gateway: GatewaySettings,
                    settings: SchedulerSettings | None = None, nodeagent_listen: str | None = None,
                    metrics_port: int = 0, metrics_host: str = "127.0.0.1", site_listen: str | None = None) -> None:
    """`site_listen`: the mutual-TLS listener for on-prem sites (docs/sites.md): ADS keyed by the site certificate's
    identity and the NodeAgent API scoped to the site; needs the PKI directory (CROSSLOGIC_PKI_DIR)."""
    settings = settings or SchedulerSettings()
    cache = SnapshotCache()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    scheduler = Scheduler(pool, cache, gateway, settings)
    watcher = asyncio.create_task(scheduler.run(database_url))
    ads = AggregatedDiscoveryServicer(cache)
    ready = readiness(pool, cache, ads)
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(ops_server(metrics_port, "xds", ready, metrics_host))
            if nodeagent_listen:
                tls = bool(settings.pki_dir)
                servicer = NodeAgentServicer(pool, tls=tls, heartbeat_interval_ms=settings.heartbeat_interval_ms,
                                             metrics_interval_ms=settings.metrics_interval_ms)
                if not tls:
                    log.warning("NodeAgent API on %s WITHOUT TLS (no CROSSLOGIC_PKI_DIR): development only",
                                nodeagent_listen)
                await stack.enter_async_context(grpc_server(
                    nodeagent_listen, lambda s: add_to_server(s, servicer), "NodeAgent API", readiness=ready,
                    services=[NODEAGENT_SERVICE],
                    credentials=server_credentials(Path(settings.pki_dir)) if tls else None))
            if site_listen:
                if not settings.pki_dir:
                    raise SystemExit("--site-listen needs CROSSLOGIC_PKI_DIR (the CA that issues site certificates)")
                site_ads = AggregatedDiscoveryServicer(cache, resolve=site_resolver(pool, scheduler))
                site_agents = NodeAgentServicer(pool, tls=True, sites=True,
                                                heartbeat_interval_ms=settings.heartbeat_interval_ms,
                                                metrics_interval_ms=settings.metrics_interval_ms)

                def register_site(s) -> None:
                    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(site_ads, s)
                    add_to_server(s, site_agents)

                await stack.enter_async_context(grpc_server(
                    site_listen, register_site, "site xDS + NodeAgent (mTLS)", readiness=ready,
                    services=[ADS_SERVICE, NODEAGENT_SERVICE], credentials=server_credentials(Path(settings.pki_dir))))
            server = await stack.enter_async_context(grpc_server(
                listen, lambda s: ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, s), "xDS",
                readiness=ready, services=[ADS_SERVICE],
                credentials=internal_tls.grpc_credentials(
                    internal_tls.service_identity(Settings().internal_tls_dir, "xds"))))
            await server.wait_for_termination()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await pool.close()


ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
NODEAGENT_SERVICE = "crosslogic.nodeagent.v1.NodeAgent"
