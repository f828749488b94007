"""Organisations (tenants): list, look up by name or id, create, suspend / resume."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from crosslogic.store.tenancy.common import (
    Conflict,
    Db,
    InvalidArgument,
    as_uuid,
    audit,
    choice,
    db_errors,
    fetch_one,
    positive,
    to_json,
    transaction,
    unique,
)
from crosslogic.store.tenancy.regions import require_regions

BILLING_PLANS = ("free", "serverless", "reserved", "enterprise")


ORG_STATUSES = ("active", "suspended")


@dataclass(frozen=True)
class Org:
    org_id: str
    name: str
    status: str
    billing_plan: str
    reserved_tps: int
    region_preferences: tuple[str, ...]
    created_at: datetime


def _org(r: asyncpg.Record) -> Org:
    return Org(
        org_id=str(r["org_id"]),
        name=r["name"],
        status=r["status"],
        billing_plan=r["billing_plan"],
        reserved_tps=r["reserved_capacity_tokens_per_sec"],
        region_preferences=tuple(json.loads(r["region_preferences"])),
        created_at=r["created_at"],
    )


_ORG_COLS = """o.org_id, o.name, o.status, o.billing_plan, o.reserved_capacity_tokens_per_sec,
    o.region_preferences::text AS region_preferences, o.created_at"""


SQL_SELECT_ORGS = f"SELECT {_ORG_COLS} FROM orgs o ORDER BY o.name"
# A name or a UUID; $2 is NULL when the reference is not a UUID.


SQL_SELECT_ORG_BY_REF = f"SELECT {_ORG_COLS} FROM orgs o WHERE o.name = $1 OR o.org_id = $2"


SQL_INSERT_ORG = f"""
INSERT INTO orgs AS o (name, billing_plan, region_preferences, reserved_capacity_tokens_per_sec)
VALUES ($1, $2, $3::text::jsonb, $4)
RETURNING {_ORG_COLS}"""


SQL_SET_ORG_STATUS = f"UPDATE orgs AS o SET status = $2 WHERE o.org_id = $1 RETURNING {_ORG_COLS}"


async def list_orgs(db: Db) -> list[Org]:
    return [_org(r) for r in await db.fetch(SQL_SELECT_ORGS)]


async def get_org(db: Db, ref: str) -> Org:
    """An org by UUID or by name."""
    return _org(await fetch_one(db, f"org {ref!r} not found", SQL_SELECT_ORG_BY_REF, ref, as_uuid(ref)))


@db_errors
async def create_org(
    db: Db,
    name: str,
    billing_plan: str = "serverless",
    region_preferences: Sequence[str] = (),
    reserved_tps: int = 0,
    *,
    actor: str = "system",
) -> Org:
    if not name.strip() or as_uuid(name):
        raise InvalidArgument("org name must be non-empty and must not look like a UUID")
    choice(billing_plan, BILLING_PLANS, "billing plan")
    positive(reserved_tps, "reserved tokens/s", zero_ok=True)
    prefs = unique(region_preferences, "region preferences")
    async with transaction(db) as conn:
        await require_regions(conn, prefs)
        if await conn.fetchrow(SQL_SELECT_ORG_BY_REF, name, None):
            raise Conflict(f"org {name!r} already exists")
        org = _org(await conn.fetchrow(SQL_INSERT_ORG, name, billing_plan, json.dumps(prefs), reserved_tps))
        await audit(conn, actor, "org.create", "org", org.org_id, to_json(org))
        return org


@db_errors
async def set_org_status(db: Db, org: str, status: str, *, actor: str = "system") -> Org:
    choice(status, ORG_STATUSES, "org status")
    async with transaction(db) as conn:
        current = await get_org(conn, org)
        updated = _org(await conn.fetchrow(SQL_SET_ORG_STATUS, uuid.UUID(current.org_id), status))
        await audit(
            conn, actor, "org.set_status", "org", updated.org_id, {"from": current.status, "to": status}
        )
        return updated
