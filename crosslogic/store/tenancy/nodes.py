"""Inference nodes added by an operator: list, look up, add / update, drain, remove."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from crosslogic.store.tenancy.common import (
    Db,
    InvalidArgument,
    as_uuid,
    audit,
    choice,
    db_errors,
    fetch_one,
    optional_id,
    to_json,
    transaction,
    unique,
)
from crosslogic.store.tenancy.models import require_models
from crosslogic.store.tenancy.orgs import get_org
from crosslogic.store.tenancy.regions import require_regions

NODE_STATUSES = ("active", "draining", "dead")
# status_reason of a node an operator cordoned: draining (no new requests) until uncordoned, never swept dead.
CORDONED = "cordoned"


@dataclass(frozen=True)
class Node:
    node_id: str
    name: str
    region: str
    model_list: tuple[str, ...]
    endpoint_host: str
    endpoint_port: int
    cloud: str
    spot: bool
    gpu_type: str
    reserved_org_id: str | None
    status: str  # provisioning, registering, active, draining, dead, terminated (xds/node_registry.py)
    status_reason: str
    engine: str
    weight: int
    last_heartbeat_at: datetime | None
    created_at: datetime


def _node(r: asyncpg.Record) -> Node:
    fields = {f: r[f] for f in Node.__dataclass_fields__}
    fields.update(
        node_id=str(r["node_id"]),
        model_list=tuple(r["model_list"]),
        reserved_org_id=optional_id(r["reserved_org_id"]),
    )
    return Node(**fields)


_NODE_COLS = """node_id, name, region, model_list, endpoint_host, endpoint_port, cloud, spot, gpu_type,
    reserved_org_id, status, status_reason, engine, weight, last_heartbeat_at, created_at"""


SQL_SELECT_NODES = (
    f"SELECT {_NODE_COLS} FROM nodes WHERE ($1::text IS NULL OR region = $1) ORDER BY region, name"
)


SQL_SELECT_NODE_BY_REF = f"SELECT {_NODE_COLS} FROM nodes WHERE name = $1 OR node_id = $2"
# Upsert on name, NULL keeps the current value. A re-added node keeps its status: draining is undone
# only on purpose (set_node_status), not by a repeated `node add` from a provisioning script.


SQL_UPSERT_NODE = f"""
INSERT INTO nodes AS n (name, region, model_list, endpoint_host, endpoint_port, cloud, spot, gpu_type,
    reserved_org_id)
VALUES ($1, $2, COALESCE($3::text[], '{{}}'), $4, $5, COALESCE($6::text, 'onprem'), COALESCE($7::bool, false),
    COALESCE($8::text, 'unknown'), $9::uuid)
ON CONFLICT (name) DO UPDATE SET
    region = $2,
    model_list = COALESCE($3::text[], n.model_list),
    endpoint_host = $4,
    endpoint_port = $5,
    cloud = COALESCE($6, n.cloud),
    spot = COALESCE($7, n.spot),
    gpu_type = COALESCE($8, n.gpu_type),
    reserved_org_id = COALESCE($9, n.reserved_org_id)
RETURNING {_NODE_COLS}"""


SQL_SET_NODE_STATUS = f"""UPDATE nodes SET status = $2, status_reason = coalesce($3, status_reason)
WHERE node_id = $1 RETURNING {_NODE_COLS}"""


SQL_DELETE_NODE = "DELETE FROM nodes WHERE node_id = $1"


async def list_nodes(db: Db, region: str | None = None) -> list[Node]:
    return [_node(r) for r in await db.fetch(SQL_SELECT_NODES, region)]


async def get_node(db: Db, ref: str) -> Node:
    """A node by name or UUID."""
    return _node(await fetch_one(db, f"node {ref!r} not found", SQL_SELECT_NODE_BY_REF, ref, as_uuid(ref)))


@db_errors
async def add_node(
    db: Db,
    name: str,
    region: str,
    endpoint_host: str,
    endpoint_port: int,
    model_list: Sequence[str] | None = None,
    cloud: str | None = None,
    spot: bool | None = None,
    gpu_type: str | None = None,
    reserved_org: str | None = None,
    *,
    actor: str = "system",
) -> Node:
    """Create or update a node by name; None keeps the current value (or the default)."""
    if not name.strip() or not endpoint_host.strip():
        raise InvalidArgument("node name and endpoint host must be non-empty")
    if not 1 <= endpoint_port <= 65535:
        raise InvalidArgument(f"endpoint port must be 1..65535, not {endpoint_port}")
    models = None if model_list is None else unique(model_list, "model list")
    async with transaction(db) as conn:
        await require_regions(conn, [region])
        if models:
            await require_models(conn, models)
        reserved = uuid.UUID((await get_org(conn, reserved_org)).org_id) if reserved_org else None
        row = await conn.fetchrow(
            SQL_UPSERT_NODE,
            name,
            region,
            models,
            endpoint_host,
            endpoint_port,
            cloud,
            spot,
            gpu_type,
            reserved,
        )
        node = _node(row)
        await audit(conn, actor, "node.upsert", "node", node.node_id, to_json(node))
        return node


@db_errors
async def set_node_status(db: Db, node: str, status: str, *, actor: str = "system",
                          reason: str | None = None) -> Node:
    """`reason` (kept unless given): CORDONED marks a drain an operator holds; the registry's drain timeout
    never turns such a node dead, and uncordoning puts it back to active."""
    choice(status, NODE_STATUSES, "node status")
    async with transaction(db) as conn:
        current = await get_node(conn, node)
        updated = _node(await conn.fetchrow(SQL_SET_NODE_STATUS, uuid.UUID(current.node_id), status, reason))
        await audit(conn, actor, "node.set_status", "node", updated.node_id,
                    {"from": current.status, "to": status, "reason": updated.status_reason})
        return updated


@db_errors
async def remove_node(db: Db, node: str, *, actor: str = "system") -> Node:
    async with transaction(db) as conn:
        current = await get_node(conn, node)
        await conn.execute(SQL_DELETE_NODE, uuid.UUID(current.node_id))
        await audit(conn, actor, "node.remove", "node", current.node_id, to_json(current))
        return current
