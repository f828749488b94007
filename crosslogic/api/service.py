"""The public/admin HTTP API process (aiohttp)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from crosslogic.api.models import build_app
from crosslogic.runtime.ops_http import ops_server
from crosslogic.runtime.readiness import Readiness, postgres_check
from crosslogic.settings import Settings
from crosslogic.store.db import open_pool

log = logging.getLogger("crosslogic.api")


async def serve_api(settings: Settings, host: str, port: int) -> None:
    async with open_pool(settings.require_database(), min_size=1, max_size=4) as pool:
        runner = web.AppRunner(build_app(pool), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("api listening on %s:%d", host, port)
        try:
            ready = Readiness().add("postgres", postgres_check(pool))
            async with ops_server(settings.api_metrics_port, "api", ready, settings.metrics_host):
                await asyncio.Event().wait()
        finally:
            await runner.cleanup()
