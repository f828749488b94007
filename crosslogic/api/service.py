"""The API process (aiohttp): the public `GET /v1/models` that Envoy routes to (--listen), and the admin API with
the developer dashboard on a listener of its own (--admin-listen) that Envoy has no route to."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from crosslogic.api.admin.app import build_admin_app
from crosslogic.api.models import build_app
from crosslogic.runtime import internal_tls
from crosslogic.runtime.ops_http import ops_server
from crosslogic.runtime.readiness import Readiness, postgres_check
from crosslogic.settings import Settings
from crosslogic.store.db import open_pool

log = logging.getLogger("crosslogic.api")


async def serve_api(settings: Settings, host: str, port: int, admin: tuple[str, int] | None = None) -> None:
    async with open_pool(settings.require_database(), min_size=1, max_size=6) as pool:
        runners = [web.AppRunner(build_app(pool), access_log=None)]
        sites = [(host, port)]
        if admin is not None:
            runners.append(web.AppRunner(build_admin_app(pool, settings.key_secret.encode(),
                                                         settings.default_region), access_log=None))
            sites.append(admin)
        # Envoy's /v1/models listener over mutual TLS in production; the admin listener is the operator's (no
        # Envoy route reaches it) and stays as configured.
        contexts = [internal_tls.ssl_context_of(internal_tls.service_identity(settings.internal_tls_dir, "api")),
                    None]
        try:
            for runner, (site_host, site_port), context in zip(runners, sites, contexts[:len(sites)], strict=True):
                await runner.setup()
                await web.TCPSite(runner, site_host, site_port, ssl_context=context).start()
            log.info("api listening on %s:%d%s", host, port,
                     f"; admin API and dashboard on http://{admin[0]}:{admin[1]}/" if admin else "")
            ready = Readiness().add("postgres", postgres_check(pool))
            async with ops_server(settings.api_metrics_port, "api", ready, settings.metrics_host):
                await asyncio.Event().wait()
        finally:
            for runner in runners:
                await runner.cleanup()
