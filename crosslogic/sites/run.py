"""`crosslogic serve site`: the site process beside a site's Envoy (docs/sites.md).

One process, four jobs, all local to the site: ext_authz for the site's org (the cloud's decision on synced
views, sites/authz.py, with the cloud's rate limiter on the site's own Valkey, the site's quotas and its bill
cap, sites/billcap.py), the
access-log service writing the durable usage spool (and settling the limiter's reservations) and the pusher that
delivers it (sites/spool.py), and the model list for `GET /v1/models`. Its only dependency on the cloud is the
site API over mutual TLS, and it keeps serving without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc

from crosslogic import errors
from crosslogic.extauthz.check import GuardedAuthorizer
from crosslogic.extauthz.decision import Authorizer
from crosslogic.extauthz.http_transport import authz_http_server
from crosslogic.extauthz.http_wire import Limits
from crosslogic.extauthz.release import LeaseReleaser
from crosslogic.ratelimit.connect import redis_client, script_client
from crosslogic.ratelimit.engine import Limiter, limiter_from_settings
from crosslogic.ratelimit.gate import AdmissionGate
from crosslogic.ratelimit.settlement import settlement_hook
from crosslogic.runtime.grpc_server import grpc_server
from crosslogic.settings import Settings
from crosslogic.sites.authz import SiteState, Syncer
from crosslogic.sites.billcap import SiteBillCap
from crosslogic.sites.quota import SiteQuotas
from crosslogic.sites.spool import Pusher, Spool, SpoolingSink
from crosslogic.usage_record import UsageRecord

log = logging.getLogger("crosslogic.sites")
CONFIG_FILE = "site.json"


@dataclass(frozen=True)
class SiteConfig:
    """site.json of a bundle (sites/bundle.py writes it)."""

    site_id: str
    site_name: str
    org_id: str
    cloud_api_url: str  # https://HOST:PORT of the cloud's site API
    cloud_xds_address: str  # HOST:PORT of the cloud's site xDS listener
    authz_port: int  # the site process's ext_authz (and release) port, loopback
    als_port: int  # its access-log service, loopback
    api_port: int  # its /v1/models, loopback
    envoy_admin_port: int
    gateway_port: int  # where the site gateway listens (the cloud's sites row; the listener comes over xDS)
    sync_interval_s: float = 2.0
    offline_max_s: float = 86400.0

    @staticmethod
    def load(directory: Path) -> SiteConfig:
        return SiteConfig(**json.loads((directory / CONFIG_FILE).read_text()))


class _LocalAuthorizer(Authorizer):
    """The cloud's decision with the site's quotas and bill cap and, with the site's Valkey, the cloud's own rate
    limiter (per site: docs/sites.md). Its key-hashing secret and default region are the last sync's."""

    def __init__(self, state: SiteState, quotas: SiteQuotas, caps: SiteBillCap, gate: AdmissionGate | None) -> None:
        super().__init__(state, state, b"", "", quotas, caps, gate)
        self.state = state

    async def decide(self, method, path, headers, body):
        self.secret, self.default_region = self.state.secret, self.state.default_region
        return await super().decide(method, path, headers, body)


def _models_app(state: SiteState) -> web.Application:
    def listing(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "crosslogic"}

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [listing(m) for m in sorted(state.models)]})

    async def model(request: web.Request) -> web.Response:
        model_id = request.match_info["model"]
        if model_id not in state.models:
            error = errors.model_not_found(model_id)
            return web.Response(status=error.status, body=error.body(), content_type="application/json")
        return web.json_response(listing(model_id))

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    return app


@asynccontextmanager
async def _limiter(settings: Settings) -> AsyncIterator[tuple[Limiter | None, Callable[[UsageRecord], None] | None]]:
    """The cloud's limiter on the site's own Valkey (`site up` starts one; CROSSLOGIC_REDIS_URL) and the
    settlement of its reservations; (None, None) without a Valkey: quotas only."""
    if not settings.redis_url:
        yield None, None
        return
    redis = redis_client(settings.redis_url, False, connect_timeout=0.5, timeout=0.5, request_path=True)
    scripts = script_client(settings.redis_url, False, connect_timeout=0.5, timeout=0.5)
    try:
        async with settlement_hook(settings) as settler:
            yield limiter_from_settings(redis, settings, scripts), settler.submit if settler is not None else None
    finally:
        await scripts.aclose()
        await redis.aclose()


async def serve_site(directory: Path) -> None:
    config = SiteConfig.load(directory)
    tls_dir = directory / "tls"
    state = SiteState(config.org_id, config.offline_max_s)
    quotas = SiteQuotas()
    caps = SiteBillCap(state, quotas)  # prices the site's spend in `quotas` from here on
    syncer = Syncer(state, config.cloud_api_url, tls_dir, directory / "sync.json", config.sync_interval_s, quotas)
    syncer.load_saved()
    spool = Spool(directory / "usage-spool.sqlite3")
    quotas.spooled(r for _, r in spool.oldest(10**9))  # what a previous run spooled and did not deliver
    wake = asyncio.Event()
    pusher = Pusher(spool, config.cloud_api_url, tls_dir, wake, quotas=quotas)
    tasks = [asyncio.create_task(syncer.run()), asyncio.create_task(pusher.run())]
    runner = web.AppRunner(_models_app(state), access_log=None)
    await runner.setup()
    try:
        async with _limiter(Settings()) as (limiter, settle):
            gate = AdmissionGate(limiter) if limiter is not None else None
            checker = GuardedAuthorizer(_LocalAuthorizer(state, quotas, caps, gate))
            releaser = LeaseReleaser(limiter) if limiter is not None else None

            def settle_all(record: UsageRecord, settle=settle) -> None:
                caps.settled(record)  # after the spool priced it into the site's spend: no gap, no double count
                if settle is not None:
                    settle(record)
            sink = SpoolingSink(spool, wake, quotas, settle_all)
            await web.TCPSite(runner, "127.0.0.1", config.api_port).start()
            async with authz_http_server(f"127.0.0.1:{config.authz_port}", checker, releaser, Limits()), \
                    grpc_server(f"127.0.0.1:{config.als_port}",
                                lambda s: als_pb2_grpc.add_AccessLogServiceServicer_to_server(sink, s),
                                "site access-log spool", grace_s=2) as server:
                log.info("site %s (org %s) serving; cloud site API %s; rate limits %s", config.site_name,
                         config.org_id, config.cloud_api_url, "on the site's Valkey" if gate else "off")
                await server.wait_for_termination()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        spool.close()
