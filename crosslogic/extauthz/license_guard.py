"""Flat-licence admission (air-gapped installs, docs/sites.md): every request of an org needs a valid installed
licence (signed by the trusted key, started, not expired), the org within its seats (active API keys), and its
tokens since the licence started plus this request's reservation within the allowance.

Refusals are OpenAI-shaped: no licence / expired / too many seats 403 (`permission_error`), allowance used up 429
(`insufficient_quota`, as OpenAI answers an exhausted quota). Bounds: the per-org state is re-read every
`refresh_s` (a licence installed, a key created, the ledger's token count); tokens of requests still in flight
are not in the ledger yet, so an org can overshoot its allowance by what is in flight plus `refresh_s` of usage.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from crosslogic import errors
from crosslogic.license import License, LicenseInvalid, verify

log = logging.getLogger("crosslogic.extauthz")

SQL_LICENSES = "SELECT body::text AS body FROM licenses WHERE org_id = $1"
SQL_USAGE = """
SELECT COALESCE(sum(total_tokens), 0)::bigint FROM usage_records WHERE org_id = $1 AND occurred_at >= $2
"""
SQL_SEATS = "SELECT count(*) FROM api_keys WHERE org_id = $1 AND status = 'active'"


def license_required() -> errors.ClientError:
    return errors.ClientError(403, "This organization has no valid license for this installation. Ask your "
                              "administrator to install one (`crosslogic license install`).", "permission_error",
                              "license_required")


def license_expired(at: str) -> errors.ClientError:
    return errors.ClientError(403, f"This organization's license expired at {at}. Ask your administrator to "
                              "install a renewed license.", "permission_error", "license_expired")


def seats_exceeded(seats: int, active: int) -> errors.ClientError:
    return errors.ClientError(403, f"This organization has {active} active API keys; its license allows {seats}. "
                              "Revoke keys or install a license with more seats.", "permission_error",
                              "license_seats_exceeded")


def tokens_exhausted(tokens: int) -> errors.ClientError:
    return errors.ClientError(429, f"This organization has used its license's allowance of {tokens} tokens. Ask "
                              "your administrator for a larger license.", "insufficient_quota",
                              "license_tokens_exhausted")


@dataclass(frozen=True)
class _OrgState:
    license: License | None
    used_tokens: int
    active_keys: int
    read_at: float


class LicenseGuard:
    def __init__(self, pool: asyncpg.Pool, public_key_pem: bytes, refresh_s: float = 2.0,
                 clock=time.monotonic) -> None:
        self.pool = pool
        self.public_key_pem = public_key_pem
        self.refresh_s = refresh_s
        self.clock = clock
        self._orgs: dict[str, _OrgState] = {}

    def _best(self, rows: list[asyncpg.Record], now: datetime) -> License | None:
        """The started licence that lasts longest (a renewal installed early wins once it starts)."""
        valid = []
        for row in rows:
            try:
                valid.append(verify(json.loads(row["body"]), self.public_key_pem))
            except LicenseInvalid as exc:
                log.error("an installed licence does not verify and is ignored: %s", exc)
        started = [lic for lic in valid if lic.starts <= now]
        return max(started, key=lambda lic: lic.expires, default=None)

    async def _state(self, org_id: str) -> _OrgState:
        state = self._orgs.get(org_id)
        if state is not None and self.clock() - state.read_at < self.refresh_s:
            return state
        org = uuid.UUID(org_id)
        async with self.pool.acquire() as conn:
            lic = self._best(await conn.fetch(SQL_LICENSES, org), datetime.now(UTC))
            used = await conn.fetchval(SQL_USAGE, org, lic.starts) if lic else 0
            keys = await conn.fetchval(SQL_SEATS, org)
        state = _OrgState(lic, int(used), int(keys), self.clock())
        self._orgs[org_id] = state
        return state

    async def check(self, org_id: str, reserve_tokens: int) -> None:
        state = await self._state(org_id)
        lic = state.license
        if lic is None:
            raise license_required()
        if lic.expires <= datetime.now(UTC):
            raise license_expired(lic.expires_at)
        if state.active_keys > lic.seats:
            raise seats_exceeded(lic.seats, state.active_keys)
        if state.used_tokens + reserve_tokens > lic.tokens:
            raise tokens_exhausted(lic.tokens)
