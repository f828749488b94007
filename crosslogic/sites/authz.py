"""A site's own ext_authz state: its org's tenant views and the model catalogue, synced from the cloud's site API
over mutual TLS and kept on disk, so the site decides every request locally, also while the link is down.

The decision itself is the cloud's (extauthz/decision.Authorizer) with these views and this catalogue; what holds
exactly and what is bounded while the site cannot reach the cloud is in docs/sites.md. In short: a key revoked,
an env suspended or a model withdrawn in the cloud reaches the site with the next sync (every
`sync_interval_s`; during a partition, when the link returns); past `offline_max_s` without a sync the site
refuses with 503 rather than decide on state that old.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from crosslogic import errors
from crosslogic.accounting.pricing import PriceBook
from crosslogic.extauthz.tenants import TenantView, view_from_row
from crosslogic.extauthz.validation import ModelSpec
from crosslogic.ratelimit.limits import PlatformLimits
from crosslogic.ratelimit.money import month_of
from crosslogic.sites.protocol import SYNC_PATH, client_context, decode_prices, decode_row
from crosslogic.sites.quota import SiteQuotas, exchange

log = logging.getLogger("crosslogic.sites")


class SiteState:
    """The last sync: views by key hash, models, secret and default region; `views`/`catalogue` protocols of the
    decision (extauthz/decision.TenantViews and Catalogue)."""

    reserved_orgs: frozenset[str] = frozenset()  # the site's pools answer every route key of its org

    def __init__(self, org_id: str, offline_max_s: float, clock=time.time) -> None:
        self.org_id = org_id
        self.offline_max_s = offline_max_s
        self.clock = clock
        self.synced_at = 0.0
        self.secret = b""
        self.default_region = ""
        self.views: dict[str, TenantView] = {}
        self.models: dict[str, ModelSpec] = {}
        self.prices = PriceBook()  # price versions and this org's terms (the bill cap's, sites/billcap.py)
        self.test_keys: frozenset[str] = frozenset()  # key ids of test keys: free, never against the bill cap
        self.revoked = False  # the cloud refused our certificate (403): not a partition, a revocation

    def install(self, payload: Mapping) -> None:
        """A sync answer (or the copy on disk). Views of another org are dropped, whatever the payload says."""
        month = month_of(datetime.now(UTC))
        views = {}
        for item in payload["views"]:
            view = view_from_row(decode_row(item["row"]), month)
            if view.org_id == self.org_id:
                views[item["key_hash"]] = view
        self.views = views
        self.models = {m["model_id"]: ModelSpec(**m) for m in payload["models"]}
        self.prices = PriceBook.from_rows(decode_prices(payload.get("prices", {"models": [], "regions": [],
                                                                            "terms": []})))
        self.test_keys = frozenset(v.key_id for v in views.values() if v.test)
        self.secret = payload["key_secret"].encode()
        self.default_region = payload["default_region"]
        self.synced_at = float(payload["synced_at"])

    def age_s(self) -> float:
        return self.clock() - self.synced_at if self.synced_at else float("inf")

    def _fresh(self) -> None:
        if self.revoked:
            raise errors.site_revoked()
        if self.age_s() > self.offline_max_s:
            raise errors.service_unavailable()  # never synced, or offline past the bound

    async def view(self, key_hash: str) -> TenantView | None:
        """A key of this org, else 403: the site holds no other org's keys, so it cannot tell another org's key
        from an unknown one, and refuses both as not valid here (a malformed key is still a 401)."""
        self._fresh()
        view = self.views.get(key_hash)
        if view is None:
            raise errors.wrong_site()
        return view

    async def platform(self) -> PlatformLimits:
        return PlatformLimits()

    async def current(self) -> Mapping[str, ModelSpec]:
        self._fresh()
        return self.models


class Syncer:
    """Pulls the org's state every `interval_s`; each good answer is installed and written to `path` (0600: it
    holds the key-hashing secret) so a restarted site serves from it before the link is back."""

    def __init__(self, state: SiteState, cloud_url: str, tls_dir: Path, path: Path, interval_s: float,
                 quotas: SiteQuotas | None = None) -> None:
        self.state = state
        self.quotas = quotas
        self.url = cloud_url.rstrip("/") + SYNC_PATH
        self.ssl = client_context(tls_dir)
        self.path = path
        self.interval_s = interval_s
        self.synced = asyncio.Event()
        self.failures = 0

    def load_saved(self) -> bool:
        if not self.path.exists():
            return False
        payload = json.loads(self.path.read_text())
        self.state.install(payload)
        if self.quotas is not None:
            self.quotas.synced_counters(payload.get("quota_counters", {}))
        log.info("serving from the saved sync of %.0f s ago until the cloud answers", self.state.age_s())
        return True

    async def sync_once(self, session: aiohttp.ClientSession) -> None:
        async with exchange(self.quotas):  # no push meanwhile (sites/quota.py)
            await self._sync(session)

    async def _sync(self, session: aiohttp.ClientSession) -> None:
        if self.quotas is not None:
            self.quotas.begin_sync()
        async with session.get(self.url, ssl=self.ssl, timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status == 403:
                if not self.state.revoked:
                    log.error("the cloud refused this site's certificate (revoked or expired): refusing every request")
                self.state.revoked = True
            if response.status != 200:
                raise RuntimeError(f"site API answered {response.status}: {(await response.text())[:200]}")
            payload = await response.json()
        self.state.revoked = False
        self.state.install(payload)
        if self.quotas is not None:
            self.quotas.synced_counters(payload.get("quota_counters", {}))
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.synced.set()

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.sync_once(session)
                    if self.failures:
                        log.info("sync with the cloud is back after %d failed attempts", self.failures)
                    self.failures = 0
                except (OSError, aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
                    self.failures += 1
                    if self.failures in (1, 10) or self.failures % 100 == 0:
                        log.warning("cannot sync with the cloud (%s); deciding from the sync of %.0f s ago", exc,
                                    self.state.age_s())
                await asyncio.sleep(self.interval_s)
