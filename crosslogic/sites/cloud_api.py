"""The cloud's site API, over mutual TLS (served by the accounting process, `--site-listen`): a site syncs its org's
tenant views and the catalogue from here, and pushes its spooled usage back.

- `GET /site/v1/sync`: everything the site's ext_authz decides with, for its own org only: each key's view row
  (keyed by its HMAC, never a key; with the org's bill cap and the ledger's month-to-date owed amount), the
  active models, the price versions (model prices, region multipliers, this org's terms only) the site prices
  its bill-cap holds with, the default region, and the key-hashing secret the HMACs are made with (the site
  hashes the keys it is shown; docs/sites.md says what that exposes).
- `POST /site/v1/usage`: a batch of usage records; every record must be of the certificate's org (else the batch is
  refused whole with 403), written with the ledger's own idempotent batch insert (a request id already in the
  ledger is skipped), so a batch re-sent after a lost answer is never billed twice. What a capped org owes now is
  settled into the cloud's bill-cap state (Valkey) at once, as for the cloud's own rows.

The caller is the verified client certificate's site identity, re-checked against revocation on every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from crosslogic import errors, pki
from crosslogic.accounting.ledger import OwedHook, write_batch
from crosslogic.accounting.pricing import price_rows
from crosslogic.commands.process import split_listen
from crosslogic.extauthz.billcap import CAP_COLUMNS, CAP_JOIN
from crosslogic.extauthz.tenants import IDENTITY_COLUMNS
from crosslogic.ratelimit.money import month_of
from crosslogic.ratelimit.quota import QUOTA_COLUMNS, quota_keys
from crosslogic.ratelimit.store import TENANT_JOINS, TENANT_LIMIT_COLUMNS
from crosslogic.sites.protocol import SYNC_PATH, USAGE_PATH, encode_prices, encode_row, record_from_json, server_context
from crosslogic.store import sites
from crosslogic.usage_record import UsageRecord

log = logging.getLogger("crosslogic.sites")

# The view rows ext_authz reads per key (extauthz/tenants.py TENANT_VIEW_SQL), for every key of one org.
ORG_VIEWS_SQL = (f"SELECT k.key_hash, {IDENTITY_COLUMNS}, {TENANT_LIMIT_COLUMNS}, {QUOTA_COLUMNS}, {CAP_COLUMNS} "
                 f"FROM {TENANT_JOINS} {CAP_JOIN.format(month='$2')} WHERE k.org_id = $1")
MODELS_SQL = """
SELECT model_id, kind, context_length, max_output_tokens, default_max_tokens, max_n
FROM models WHERE status = 'active' ORDER BY model_id
"""
MAX_BATCH = 5000
# How long a push waits for its records to be counted in the quota counters before it is answered 503 (Valkey away):
# under the site's 15 s push timeout, so the site hears why and sends the batch again (counted once by request id).
COUNT_WAIT_S = 10.0


def _forbidden(message: str) -> web.Response:
    return web.Response(status=403, body=errors.openai_error_json(message, "permission_error", "site_refused"),
                        content_type="application/json")


def peer_identity(request: web.Request) -> pki.SiteIdentity | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    return pki.site_identity_of(pem)


Count = Callable[[list[UsageRecord]], Awaitable[None]]


class SiteApi:
    """`count`: the accounting sink's settlement (idempotent per request id), returning once the records are
    settled: a site's delivered usage counts against the org's quotas and rate-limit windows like the cloud's own,
    and before the push is answered (sites/quota.py: a sync begun after the answer must hold it). `redis`: where
    the sync reads the quota counters (None: the site is sent none and counts only its own usage). `on_owed`: the
    accounting's bill-cap settlement (ratelimit/money.py): without it the cloud's gateways would check a capped
    org against what it owed before the push until ext_authz's next read of the ledger (~1 s)."""

    def __init__(self, pool: asyncpg.Pool, key_secret: str, default_region: str,
                 count: Count | None = None, redis=None, on_owed: OwedHook | None = None) -> None:
        self.pool = pool
        self.key_secret = key_secret
        self.default_region = default_region
        self.count = count
        self.redis = redis
        self.on_owed = on_owed

    async def _quota_counters(self, org_id: str, env_ids: set[str]) -> dict[str, int]:
        """The org's and its environments' current day / hour quota counters (ratelimit/quota.py keys)."""
        if self.redis is None or not env_ids:
            return {}
        keys = sorted({k for env in env_ids for k in quota_keys(org_id, env, datetime.now(UTC))})
        try:
            values = await self.redis.mget(keys)
        except (OSError, aioredis.RedisError) as exc:
            log.warning("quota counters unavailable for a site sync (%s)", exc)
            return {}
        return {k: int(v or 0) for k, v in zip(keys, values, strict=True)}

    async def _identity(self, request: web.Request) -> pki.SiteIdentity | None:
        identity = peer_identity(request)
        if identity is None or not await sites.verify(self.pool, identity):
            return None
        return identity

    async def sync(self, request: web.Request) -> web.StreamResponse:
        identity = await self._identity(request)
        if identity is None:
            return _forbidden("this certificate does not admit a site (revoked, expired or no site identity)")
        now = datetime.now(UTC)
        async with self.pool.acquire() as conn:
            views = await conn.fetch(ORG_VIEWS_SQL, uuid.UUID(identity.org_id), month_of(now))
            models = await conn.fetch(MODELS_SQL)
            prices = await price_rows(conn, [identity.org_id])
        return web.json_response({
            "org_id": identity.org_id, "site_id": identity.site_id, "synced_at": time.time(),
            "key_secret": self.key_secret, "default_region": self.default_region,
            "models": [dict(m) for m in models], "prices": encode_prices(prices),
            "quota_counters": await self._quota_counters(identity.org_id, {v["env_id"] for v in views}),
            "views": [{"key_hash": v["key_hash"], "row": encode_row({k: v[k] for k in v.keys() if k != "key_hash"})}
                      for v in views]})

    async def usage(self, request: web.Request) -> web.StreamResponse:
        identity = await self._identity(request)
        if identity is None:
            return _forbidden("this certificate does not admit a site (revoked, expired or no site identity)")
        try:
            body = await request.json()
            records = [record_from_json(r) for r in body["records"]]
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(status=400, content_type="application/json", body=errors.openai_error_json(
                f"malformed usage batch: {exc}", "invalid_request_error", "invalid_batch"))
        if len(records) > MAX_BATCH:
            return web.Response(status=413, content_type="application/json", body=errors.openai_error_json(
                f"at most {MAX_BATCH} records per batch", "invalid_request_error", "batch_too_large"))
        foreign = sum(1 for r in records if r.org_id != identity.org_id)
        if foreign:  # a site bills its own org only; nothing of the batch is written
            log.warning("site %s pushed %d usage records of another org; batch refused", identity.site_id, foreign)
            return _forbidden(f"{foreign} record(s) are not of this site's organization")
        async with self.pool.acquire() as conn:
            result = await write_batch(conn, records, written_by="site")
        if result.owed and self.on_owed is not None:  # raise Valkey's owed to the ledger's (no reservation here)
            self.on_owed(result.owed)
        if self.count is not None:  # in the ledger now: count them (a re-sent record is counted once)
            try:
                await asyncio.wait_for(self.count(records), COUNT_WAIT_S)
            except TimeoutError:
                return web.Response(status=503, content_type="application/json", body=errors.openai_error_json(
                    "usage recorded but not yet counted against quotas; send the batch again", "server_error",
                    "usage_not_counted"))
        return web.json_response({"accepted": len(records), "inserted": result.inserted, "held": result.held})


@asynccontextmanager
async def site_api_server(listen: str, pool: asyncpg.Pool, pki_dir: Path, key_secret: str, default_region: str,
                          count: Count | None = None, redis=None,
                          on_owed: OwedHook | None = None) -> AsyncIterator[web.AppRunner]:
    api = SiteApi(pool, key_secret, default_region, count, redis, on_owed)
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_get(SYNC_PATH, api.sync)
    app.router.add_post(USAGE_PATH, api.usage)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_listen(listen)
    await web.TCPSite(runner, host, port, ssl_context=server_context(pki_dir)).start()
    log.info("site API (mTLS) listening on %s", listen)
    try:
        yield runner
    finally:
        await runner.cleanup()
