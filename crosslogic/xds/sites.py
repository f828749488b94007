"""Per-identity xDS for on-prem sites: what one site's gateway is sent, and which certificates may still stream.

A site gateway gets only its org's resources: its own nodes first (priority 0 and the region's fallbacks), then
the cloud's shared pool at the following priorities when the site allows spilling (`sites.cloud_spill`), never a
node of another org or another site. Each pool is named twice, under the org's lane key (`region/model@org`) and
the shared key (`region/model`), so whichever route ext_authz names for the org resolves to the site-first pool.
The listener binds the site's own address and tells ext_authz the site's org (SITE_ORG_HEADER): another org's key
is refused at the site with 403.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import asyncpg

from crosslogic.xds.model import GatewaySettings, Pool
from crosslogic.xds.policy import RoutingPolicy
from crosslogic.xds.registry import NodeView, assemble_pools
from crosslogic.xds.snapshot import Snapshot, build_snapshot

SQL_SITES = """
SELECT site_id::text AS site_id, org_id::text AS org_id, cloud_spill, gateway_host, gateway_port
FROM sites WHERE status = 'active' ORDER BY site_id
"""
# The identities (xds/cache.SiteCaches keys) that may hold a stream: unrevoked, unexpired certificates of active sites.
SQL_ADMITTED = """
SELECT 'site:' || c.site_id::text || ':' || c.serial AS key
FROM site_certificates c JOIN sites s USING (site_id)
WHERE s.status = 'active' AND c.revoked_at IS NULL AND c.not_after > now()
"""


@dataclass(frozen=True)
class SiteRow:
    site_id: str
    org_id: str
    cloud_spill: bool
    gateway_host: str
    gateway_port: int


def site_pools(site: SiteRow, nodes: list[NodeView], policy: RoutingPolicy, models: Mapping[str, float]) -> list[Pool]:
    own = [replace(n, reserved_org=site.org_id) for n in nodes if n.site == site.site_id]
    shared = [n for n in nodes if n.site is None and n.reserved_org is None] if site.cloud_spill else []
    pools = assemble_pools(own + shared, policy, models)
    lane = [p for p in pools if p.lane == site.org_id]
    chosen = lane if lane else [p for p in pools if p.lane is None]  # no own node yet: the cloud pool only
    named = {p.cluster_name: p for p in [*(replace(p, lane=site.org_id) for p in chosen),
                                         *(replace(p, lane=None) for p in chosen)]}
    return [named[name] for name in sorted(named)]


def site_gateway(site: SiteRow, cloud: GatewaySettings) -> GatewaySettings:
    """The cloud gateway's settings with the site's own listener, no file usage log (that path is the cloud host's;
    a site's usage goes over the access-log stream to its spool) and no public TLS files of the cloud's host. The
    site process answers ext_authz over HTTP with admission inside the check (sites/run.py), whatever the cloud's
    own gateways use."""
    return replace(cloud, listen_host=site.gateway_host, listen_port=site.gateway_port, extra_listeners=(),
                   usage_log_path="", tls_cert_path="", tls_key_path="", site_org=site.org_id,
                   authz_transport="http", admission="authz")


def site_snapshot(site: SiteRow, nodes: list[NodeView], policy: RoutingPolicy, models: Mapping[str, float],
                  cloud: GatewaySettings) -> Snapshot:
    return build_snapshot(site_pools(site, nodes, policy, models), site_gateway(site, cloud))


async def load_sites(conn: asyncpg.Connection) -> tuple[list[SiteRow], set[str]]:
    """Active sites, and the identity keys still admitted."""
    sites = [SiteRow(**dict(r)) for r in await conn.fetch(SQL_SITES)]
    return sites, {r["key"] for r in await conn.fetch(SQL_ADMITTED)}
