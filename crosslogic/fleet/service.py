"""`crosslogic serve fleet --listen HOST:PORT`: the autoscaler as its own process (Prometheus /metrics,
/healthz and /readyz on the listen address). Any number of replicas may run against one Postgres: pools are
decided under advisory locks."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from crosslogic.fleet.autoscaler import Autoscaler, AutoscalerOptions
from crosslogic.fleet.metrics import FleetMetrics
from crosslogic.fleet.provider import Machine, NodeSpec, Provider
from crosslogic.runtime.ops_http import add_health_routes
from crosslogic.runtime.readiness import Readiness, postgres_check
from crosslogic.settings import FleetSettings, SchedulerSettings, Settings, SettingsError
from crosslogic.store.db import open_pool

log = logging.getLogger("crosslogic.fleet")


class NoProvider:
    """`CROSSLOGIC_FLEET_PROVIDER=none`: decisions are taken, audited and exported; every launch fails."""

    name = "none"

    async def launch(self, spec: NodeSpec) -> Machine:
        from crosslogic.fleet.provider import LaunchFailed

        raise LaunchFailed("no provider configured (CROSSLOGIC_FLEET_PROVIDER=none)")

    async def terminate(self, name: str) -> None:
        return None

    async def list(self) -> list[Machine]:
        return []

    def price(self, spec: NodeSpec) -> int | None:
        return None


async def make_provider(fleet: FleetSettings) -> Provider:
    if fleet.provider == "none":
        return NoProvider()
    if not fleet.control_plane:
        raise SettingsError("CROSSLOGIC_FLEET_CONTROL_PLANE is not set (the NodeAgent address launched agents dial)")
    pki_dir = SchedulerSettings().pki_dir
    if not pki_dir:
        raise SettingsError("CROSSLOGIC_PKI_DIR is not set (launched nodes get certificates from its CA)")
    if fleet.provider == "skypilot":
        from crosslogic.fleet.skypilot import SkyPilotProvider

        return SkyPilotProvider(control_plane=fleet.control_plane, pki_dir=Path(pki_dir),
                                install=fleet.skypilot_install)
    from crosslogic.fleet.local import LocalOptions, LocalProvider

    workdir = Path(fleet.workdir or "fleet")
    provider = LocalProvider(LocalOptions(
        control_plane=fleet.control_plane, pki_dir=Path(pki_dir), workdir=workdir,
        heartbeat_interval_s=fleet.local_agent_interval_s, metrics_interval_s=fleet.local_agent_interval_s,
        on_demand_microdollars_per_hour=round(fleet.local_price_usd_per_hour * 1_000_000),
        spot_microdollars_per_hour=round(fleet.local_spot_price_usd_per_hour * 1_000_000)))
    await provider.start()
    return provider


async def serve_fleet(settings: Settings, listen_host: str, listen_port: int) -> None:
    fleet = FleetSettings()
    provider = await make_provider(fleet)
    metrics = FleetMetrics()

    async def scrape(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(metrics.registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    readiness = Readiness()
    add_health_routes(app, "fleet", readiness)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        async with open_pool(settings.require_database(), max_size=4) as pool:
            readiness.add("postgres", postgres_check(pool))
            await _run(pool, provider, metrics, fleet, runner, listen_host, listen_port)
    finally:
        close = getattr(provider, "close", None)
        if close is not None:
            await close()
        await runner.cleanup()


async def _run(pool, provider: Provider, metrics: FleetMetrics, fleet: FleetSettings, runner: web.AppRunner,
               listen_host: str, listen_port: int) -> None:
    await web.TCPSite(runner, listen_host, listen_port).start()
    autoscaler = Autoscaler(pool, provider, AutoscalerOptions(metrics_stale_s=fleet.metrics_stale_s,
                                                              drain_grace_s=fleet.drain_grace_s), metrics=metrics)
    log.info("fleet autoscaler %s serving /metrics on %s:%s (provider %s, tick %.1f s)",
             autoscaler.options.replica, listen_host, listen_port, provider.name, fleet.tick_s)
    await autoscaler.run(fleet.tick_s)


