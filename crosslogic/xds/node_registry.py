"""The node registry in Postgres: what agents report (registration, heartbeats, load) and the sweeper.

State machine of an agent-managed node (seed §22-§23):

    active --(spot notice | shutdown | upgrade drain)--> draining --(drain TTL | shutdown done)--> dead
    active/draining --(no heartbeat for dead_after)--> dead;  dead --(remove_after)--> row deleted
    (no heartbeat for heartbeat_timeout: still 'active' in the table, but UNHEALTHY in every snapshot)

A machine the fleet launched (crosslogic/fleet, migration 009) starts earlier and ends later:

    provisioning (asked of the provider) --> registering (machine up) --(agent registers)--> active ...
    ... dead --(the fleet gave the machine back)--> terminated --(remove_after)--> row deleted
    (a launch that fails, or never registers in time, goes to terminated directly)

Only active and draining nodes are routed to; the other states are bookkeeping (and FinOps: a machine costs
from provisioning to terminated, see node_lifetimes).

Nodes added by an operator without an agent (`agent_managed = false`) follow only their status column.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

SQL_REGISTER = """
INSERT INTO nodes AS n (name, region, cloud, spot, gpu_type, vram_total_gb, vram_free_gb,
    throughput_tokens_per_sec, model_list, endpoint_host, endpoint_port, tailnet_ip, reserved_org_id,
    model_version, engine, prefill_tokens_per_sec, site_id, agent_managed, status, status_reason, last_heartbeat_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULLIF($12, ''), $13::uuid, $14, $15, $16, $17::uuid, true,
    'active',
    'registered', now())
ON CONFLICT (name) DO UPDATE SET
    region = EXCLUDED.region, cloud = EXCLUDED.cloud, spot = EXCLUDED.spot, gpu_type = EXCLUDED.gpu_type,
    vram_total_gb = EXCLUDED.vram_total_gb, vram_free_gb = EXCLUDED.vram_free_gb,
    throughput_tokens_per_sec = EXCLUDED.throughput_tokens_per_sec, model_list = EXCLUDED.model_list,
    endpoint_host = EXCLUDED.endpoint_host, endpoint_port = EXCLUDED.endpoint_port,
    tailnet_ip = EXCLUDED.tailnet_ip, reserved_org_id = EXCLUDED.reserved_org_id,
    model_version = EXCLUDED.model_version, engine = EXCLUDED.engine,
    prefill_tokens_per_sec = EXCLUDED.prefill_tokens_per_sec, site_id = EXCLUDED.site_id, agent_managed = true,
    status = 'active', status_reason = 'registered', last_heartbeat_at = now()
RETURNING node_id::text AS node_id, (xmax = 0) AS created
"""
SQL_EXISTING_SCOPE = """
SELECT cloud, reserved_org_id::text AS reserved_org_id, site_id::text AS site_id FROM nodes WHERE name = $1"""
SQL_RESET_LOAD = """
INSERT INTO node_load (node_id) VALUES ($1::uuid)
ON CONFLICT (node_id) DO UPDATE SET last_heartbeat_at = now(), engine_healthy = true, requests_running = 0,
    requests_waiting = 0, kv_cache_usage = 0, generation_tokens_per_sec = 0, metrics_at = NULL
"""
# Every agent call after registration acts on one node, and only if the node is still in the scope the caller's
# certificate was checked against just before (read_owner): $cloud/$org pin the write to the owner that was
# allowed, so a node moved to another scope in between is left alone. NULL $cloud = plaintext mode, no pin.
_PINNED = "($cloud::text IS NULL OR (n.cloud = $cloud::text AND n.reserved_org_id IS NOT DISTINCT FROM $org::uuid))"
SQL_OWNER = """
SELECT cloud, reserved_org_id::text AS reserved_org_id, site_id::text AS site_id FROM nodes WHERE node_id = $1"""
SQL_HEARTBEAT = f"""
UPDATE node_load l SET last_heartbeat_at = now(), engine_healthy = $2
FROM nodes n
WHERE l.node_id = $1 AND n.node_id = l.node_id AND {_PINNED.replace("$cloud", "$3").replace("$org", "$4")}
RETURNING n.status
"""
# The TTFT baseline moves only outside spikes, so a spike cannot raise its own yardstick.
SQL_METRICS = f"""
UPDATE node_load SET last_heartbeat_at = now(), requests_running = $2, requests_waiting = $3,
    kv_cache_usage = $4, generation_tokens_per_sec = $5, metrics_at = now(), ttft_s = $6::float8,
    ttft_baseline_s = CASE
        WHEN $6::float8 <= 0 THEN ttft_baseline_s
        WHEN ttft_baseline_s IS NULL THEN $6::float8
        WHEN $6::float8 > ttft_baseline_s * $7::float8 THEN ttft_baseline_s
        ELSE ttft_baseline_s * 0.8 + $6::float8 * 0.2 END
WHERE node_id = $1 AND EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = $1
                                AND {_PINNED.replace("$cloud", "$8").replace("$org", "$9")})
"""
LATENCY_SPIKE_FACTOR = 3.0  # seed §22.2: latency > 3x its baseline
SQL_DRAIN = f"""
UPDATE nodes n SET status = 'draining', status_reason = $2
WHERE node_id = $1 AND status = 'active' AND {_PINNED.replace("$cloud", "$3").replace("$org", "$4")}
"""
SQL_SHUTDOWN = f"""
UPDATE nodes n SET status = 'dead', status_reason = $2
WHERE node_id = $1 AND status NOT IN ('dead', 'terminated')
  AND {_PINNED.replace("$cloud", "$3").replace("$org", "$4")}
"""
# The sweeper: one statement each, safe to run from several control-plane replicas at once.
SQL_SWEEP_SILENT = """
UPDATE nodes n SET status = 'dead', status_reason = 'no heartbeat'
FROM node_load l
WHERE l.node_id = n.node_id AND n.agent_managed AND n.status IN ('active', 'draining')
  AND l.last_heartbeat_at < now() - make_interval(secs => $1)
"""
SQL_SWEEP_DRAINED = """
UPDATE nodes SET status = 'dead', status_reason = 'drain finished'
WHERE agent_managed AND status = 'draining' AND status_reason <> 'cordoned'
  AND status_changed_at < now() - make_interval(secs => $1)
"""
SQL_SWEEP_REMOVE = """
DELETE FROM nodes
WHERE (agent_managed AND status = 'dead' OR status = 'terminated')
  AND status_changed_at < now() - make_interval(secs => $1)
"""
SQL_SWEEP_DUE = """
SELECT
  EXISTS (SELECT 1 FROM nodes n JOIN node_load l USING (node_id) WHERE n.agent_managed
          AND n.status IN ('active', 'draining')
          AND l.last_heartbeat_at < now() - make_interval(secs => $1)) AS silent,
  EXISTS (SELECT 1 FROM nodes WHERE agent_managed AND status = 'draining'
          AND status_changed_at < now() - make_interval(secs => $2)) AS drained,
  EXISTS (SELECT 1 FROM nodes WHERE (agent_managed AND status = 'dead' OR status = 'terminated')
          AND status_changed_at < now() - make_interval(secs => $3)) AS removable
"""
SQL_DRAIN_OLD_VERSIONS = """
UPDATE nodes old SET status = 'draining', status_reason = 'upgrade to ' || $2
WHERE old.status = 'active' AND $1 = ANY (old.model_list) AND old.model_version <> $2
  AND EXISTS (SELECT 1 FROM nodes new WHERE new.status = 'active' AND $1 = ANY (new.model_list)
              AND new.model_version = $2 AND new.region = old.region)
RETURNING old.name
"""


class ScopeViolation(Exception):
    """A node certificate's scope does not allow what the registration claims."""


@dataclass(frozen=True)
class Registration:
    name: str
    region: str
    cloud: str
    spot: bool
    gpu_type: str
    vram_total_gb: int
    vram_free_gb: int
    throughput_tokens_per_sec: int
    models: tuple[str, ...]
    endpoint_host: str
    endpoint_port: int
    tailnet_ip: str = ""
    reserved_org_id: str = ""
    model_version: str = ""
    engine: str = "vllm"
    prefill_tokens_per_sec: int = 0


@dataclass(frozen=True)
class Lifetimes:
    """Seconds: when a silent node counts as unhealthy, then dead; how long drains and dead rows last."""

    heartbeat_timeout_s: float = 15.0
    dead_after_s: float = 60.0
    drain_ttl_s: float = 120.0
    remove_after_s: float = 3600.0


@dataclass(frozen=True)
class NodeScope:
    """What a node certificate allows: one cloud pool (any region), the cloud nodes reserved for one org, or the
    nodes of one on-prem site (`site`: value = site id, `org` = the site's org; docs/sites.md)."""

    kind: str  # "pool", "org" or "site"
    value: str
    org: str = ""  # kind "site": the site's org

    @staticmethod
    def parse(text: str) -> NodeScope:
        kind, _, value = text.partition(":")
        if kind not in ("pool", "org") or not value:
            raise ScopeViolation(f"malformed node scope {text!r}")
        return NodeScope(kind, value)

    @staticmethod
    def site(site_id: str, org_id: str) -> NodeScope:
        return NodeScope("site", site_id, org_id)

    @property
    def site_id(self) -> str:
        return self.value if self.kind == "site" else ""

    def __str__(self) -> str:
        return f"site:{self.value} (org {self.org})" if self.kind == "site" else f"{self.kind}:{self.value}"

    def allows(self, cloud: str, reserved_org_id: str, site_id: str = "") -> bool:
        if self.kind == "site":  # only its own org's nodes, and only at this site
            return reserved_org_id == self.org and site_id == self.value
        if site_id:
            return False  # a cloud certificate never reaches a site's nodes
        if self.kind == "org":
            return reserved_org_id == self.value
        return not reserved_org_id and cloud == self.value


def check_scope(scope: NodeScope | None, reg: Registration, existing: asyncpg.Record | None) -> None:
    """Raises ScopeViolation when the certificate may not register this node (or take over its name)."""
    if scope is None:
        return  # plaintext development mode: no certificates at all
    if not scope.allows(reg.cloud, reg.reserved_org_id, scope.site_id):
        raise ScopeViolation(f"certificate scope {scope} may not register a node with cloud {reg.cloud!r}"
                             f" and reserved org {reg.reserved_org_id or 'none'!r}")
    if existing is not None and not scope.allows(existing["cloud"], existing["reserved_org_id"] or "",
                                                 existing.get("site_id") or ""):
        raise ScopeViolation(f"node name {reg.name!r} belongs to another scope")


async def register(conn: asyncpg.Connection, reg: Registration, scope: NodeScope | None) -> str:
    async with conn.transaction():
        check_scope(scope, reg, await conn.fetchrow(SQL_EXISTING_SCOPE, reg.name))
        row = await conn.fetchrow(
            SQL_REGISTER, reg.name, reg.region, reg.cloud, reg.spot, reg.gpu_type, reg.vram_total_gb,
            reg.vram_free_gb, reg.throughput_tokens_per_sec, list(reg.models), reg.endpoint_host,
            reg.endpoint_port, reg.tailnet_ip, uuid.UUID(reg.reserved_org_id) if reg.reserved_org_id else None,
            reg.model_version, reg.engine, reg.prefill_tokens_per_sec,
            uuid.UUID(scope.site_id) if scope is not None and scope.site_id else None)
        await conn.execute(SQL_RESET_LOAD, row["node_id"])
        return row["node_id"]


Pin = tuple[str | None, uuid.UUID | None]  # (cloud, reserved org) a write must still find; (None, None) = no pin
_UNPINNED: Pin = (None, None)


def _node_uuid(node_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(node_id)
    except (ValueError, AttributeError, TypeError):
        return None  # a malformed id names no node


async def owner_pin(conn: asyncpg.Connection, node: uuid.UUID, scope: NodeScope | None) -> Pin | None:
    """What a call about `node` may write: None if the node is unknown; raises ScopeViolation if the caller's
    certificate scope does not cover the node (registration checked the scope once; every later call checks
    it again, or one scope's certificate could drain or retire another scope's nodes)."""
    if scope is None:
        return _UNPINNED  # plaintext development mode: no certificates at all
    row = await conn.fetchrow(SQL_OWNER, node)
    if row is None:
        return None
    if not scope.allows(row["cloud"], row["reserved_org_id"] or "", row["site_id"] or ""):
        raise ScopeViolation(f"certificate scope {scope} does not cover node {node}")
    return row["cloud"], uuid.UUID(row["reserved_org_id"]) if row["reserved_org_id"] else None


async def heartbeat(conn: asyncpg.Connection, node_id: str, engine_healthy: bool = True,
                    scope: NodeScope | None = None) -> str | None:
    """Returns the node's registry status, or None when it is unknown (the agent must register again)."""
    node = _node_uuid(node_id)
    pin = None if node is None else await owner_pin(conn, node, scope)
    if pin is None:
        return None
    return await conn.fetchval(SQL_HEARTBEAT, node, engine_healthy, *pin)


async def record_metrics(conn: asyncpg.Connection, node_id: str, running: float, waiting: float,
                         kv_cache_usage: float, tokens_per_sec: float, mean_ttft_s: float = 0.0,
                         scope: NodeScope | None = None) -> bool:
    """False when the node is unknown."""
    node = _node_uuid(node_id)
    pin = None if node is None else await owner_pin(conn, node, scope)
    if pin is None:
        return False
    status = await conn.execute(SQL_METRICS, node, running, waiting, kv_cache_usage, tokens_per_sec, mean_ttft_s,
                                LATENCY_SPIKE_FACTOR, *pin)
    return status != "UPDATE 0"


async def _set_status(conn: asyncpg.Connection, sql: str, node_id: str, reason: str,
                      scope: NodeScope | None) -> None:
    node = _node_uuid(node_id)
    pin = None if node is None else await owner_pin(conn, node, scope)
    if pin is not None:  # an unknown node has nothing left to drain or retire
        await conn.execute(sql, node, reason, *pin)


async def drain(conn: asyncpg.Connection, node_id: str, reason: str, scope: NodeScope | None = None) -> None:
    await _set_status(conn, SQL_DRAIN, node_id, reason, scope)


async def shut_down(conn: asyncpg.Connection, node_id: str, reason: str, scope: NodeScope | None = None) -> None:
    await _set_status(conn, SQL_SHUTDOWN, node_id, reason, scope)


async def drain_old_versions(conn: asyncpg.Connection, model: str, version: str) -> list[str]:
    """Model upgrade (seed §30): drain nodes of other versions wherever a node of `version` is active."""
    return [r["name"] for r in await conn.fetch(SQL_DRAIN_OLD_VERSIONS, model, version)]


async def sweep(conn: asyncpg.Connection, lifetimes: Lifetimes) -> None:
    """Moves silent and drained nodes on. Checks first: an UPDATE touching no row still fires the
    statement-level NOTIFY trigger, and every listener would rebuild for nothing."""
    due = await conn.fetchrow(SQL_SWEEP_DUE, lifetimes.dead_after_s, lifetimes.drain_ttl_s, lifetimes.remove_after_s)
    if due["silent"]:
        await conn.execute(SQL_SWEEP_SILENT, lifetimes.dead_after_s)
    if due["drained"]:
        await conn.execute(SQL_SWEEP_DRAINED, lifetimes.drain_ttl_s)
    if due["removable"]:
        await conn.execute(SQL_SWEEP_REMOVE, lifetimes.remove_after_s)
