"""On-prem sites and their certificates (migration 011): create, list, revoke, issue / rotate certificates, and the
one check every site stream and call runs (`verify`). Every change writes its audit_log row in its transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from crosslogic import pki
from crosslogic.store.tenancy import Conflict, Db, InvalidArgument, NotFound, audit, get_org, to_json, transaction
from crosslogic.store.tenancy.common import as_uuid


@dataclass(frozen=True)
class Site:
    site_id: str
    org_id: str
    org_name: str
    name: str
    status: str
    cloud_spill: bool
    gateway_host: str
    gateway_port: int
    created_at: datetime
    revoked_at: datetime | None
    certificates: int = 0  # valid (unrevoked, unexpired) certificates


_COLS = """s.site_id::text AS site_id, s.org_id::text AS org_id, o.name AS org_name, s.name, s.status, s.cloud_spill,
    s.gateway_host, s.gateway_port, s.created_at, s.revoked_at,
    (SELECT count(*) FROM site_certificates c WHERE c.site_id = s.site_id AND c.revoked_at IS NULL
       AND c.not_after > now())::int AS certificates"""
SQL_LIST = f"SELECT {_COLS} FROM sites s JOIN orgs o USING (org_id) ORDER BY s.name"
SQL_GET = f"SELECT {_COLS} FROM sites s JOIN orgs o USING (org_id) WHERE s.name = $1 OR s.site_id = $2"
SQL_INSERT = """
INSERT INTO sites (org_id, name, cloud_spill, gateway_host, gateway_port) VALUES ($1, $2, $3, $4, $5)
RETURNING site_id::text"""
SQL_REVOKE = "UPDATE sites SET status = 'revoked', revoked_at = now() WHERE site_id = $1 AND status = 'active'"
SQL_REVOKE_CERTS = """
UPDATE site_certificates SET revoked_at = now() WHERE site_id = $1 AND revoked_at IS NULL RETURNING serial"""
SQL_INSERT_CERT = "INSERT INTO site_certificates (serial, site_id, not_after) VALUES ($1, $2, $3)"
# A certificate still admits its holder: its site active, itself not revoked and not expired (the TLS handshake
# already checked the CA signature and validity period; this is what the handshake cannot know).
SQL_VERIFY = """
SELECT s.org_id::text AS org_id FROM site_certificates c JOIN sites s USING (site_id)
WHERE c.serial = $1 AND c.site_id = $2 AND s.org_id = $3 AND s.status = 'active' AND c.revoked_at IS NULL
  AND c.not_after > now()
"""


def _site(row: asyncpg.Record) -> Site:
    return Site(**dict(row))


async def list_sites(db: Db) -> list[Site]:
    return [_site(r) for r in await db.fetch(SQL_LIST)]


async def get_site(db: Db, ref: str) -> Site:
    row = await db.fetchrow(SQL_GET, ref, as_uuid(ref))
    if row is None:
        raise NotFound(f"site {ref!r} not found")
    return _site(row)


async def create_site(db: Db, org: str, name: str, *, cloud_spill: bool = True, gateway_host: str = "0.0.0.0",
                      gateway_port: int = 8443, actor: str = "system") -> Site:
    if not name or as_uuid(name) is not None or "/" in name:
        raise InvalidArgument("site name must be non-empty, without '/', and must not look like a UUID")
    async with transaction(db) as conn:
        owner = await get_org(conn, org)
        try:
            site_id = await conn.fetchval(SQL_INSERT, uuid.UUID(owner.org_id), name, cloud_spill, gateway_host,
                                           gateway_port)
        except asyncpg.UniqueViolationError:
            raise Conflict(f"site {name!r} already exists") from None
        site = await get_site(conn, site_id)
        await audit(conn, actor, "site.create", "site", site.site_id, to_json(site))
        return site


async def revoke_site(db: Db, ref: str, *, actor: str = "system") -> list[str]:
    """Revokes the site and every certificate it holds; returns the serials revoked. The xDS site listener closes
    their streams within a scheduler tick (NOTIFY on the routing channel wakes it at once)."""
    async with transaction(db) as conn:
        site = await get_site(conn, ref)
        await conn.execute(SQL_REVOKE, uuid.UUID(site.site_id))
        serials = [r["serial"] for r in await conn.fetch(SQL_REVOKE_CERTS, uuid.UUID(site.site_id))]
        await audit(conn, actor, "site.revoke", "site", site.site_id, {"name": site.name, "certificates": serials})
        return serials


async def issue_certificate(db: Db, ref: str, ca: pki.Issued, *, days: float = 90,
                            actor: str = "system") -> tuple[Site, pki.Issued]:
    """A new certificate for an active site. Also the rotation: the old ones stay valid until their own expiry,
    so the site swaps files at its pace and nothing is cut off."""
    async with transaction(db) as conn:
        site = await get_site(conn, ref)
        if site.status != "active":
            raise InvalidArgument(f"site {site.name!r} is revoked; create a new site")
        issued = pki.issue_site(ca, site.org_id, site.site_id, days)
        serial, not_after = pki.serial_of(issued.cert_pem), pki.not_after_of(issued.cert_pem)
        await conn.execute(SQL_INSERT_CERT, serial, uuid.UUID(site.site_id), not_after)
        await audit(conn, actor, "site.certificate.issue", "site", site.site_id,
                    {"name": site.name, "serial": serial, "not_after": not_after.isoformat()})
        return site, issued


async def verify(db: Db, identity: pki.SiteIdentity) -> bool:
    """Whether a verified site certificate still admits its holder (site active, certificate unrevoked, unexpired)."""
    site, org = as_uuid(identity.site_id), as_uuid(identity.org_id)
    if site is None or org is None:
        return False
    return await db.fetchval(SQL_VERIFY, identity.serial, site, org) is not None
