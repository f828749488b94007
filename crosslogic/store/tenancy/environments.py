"""Environments inside an organisation: list, look up, create, suspend / resume."""

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
    NotFound,
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
from crosslogic.store.tenancy.models import require_models
from crosslogic.store.tenancy.orgs import get_org
from crosslogic.store.tenancy.regions import require_regions

ENV_STATUSES = ("active", "suspended")


@dataclass(frozen=True)
class Environment:
    env_id: str
    org_id: str
    org_name: str
    name: str
    status: str
    region: str | None
    model_list: tuple[str, ...]
    quota_tokens_per_day: int | None
    concurrency_limit: int | None
    created_at: datetime


def _env(r: asyncpg.Record) -> Environment:
    return Environment(
        env_id=str(r["env_id"]),
        org_id=str(r["org_id"]),
        org_name=r["org_name"],
        name=r["name"],
        status=r["status"],
        region=r["region"],
        model_list=tuple(json.loads(r["model_list"])),
        quota_tokens_per_day=r["quota_tokens_per_day"],
        concurrency_limit=r["concurrency_limit"],
        created_at=r["created_at"],
    )


_ENV_COLS = """e.env_id, e.org_id, o.name AS org_name, e.name, e.status, e.region,
    e.model_list::text AS model_list, e.quota_tokens_per_day, e.concurrency_limit, e.created_at"""


_ENV_FROM = "FROM environments e JOIN orgs o ON o.org_id = e.org_id"


SQL_SELECT_ENVS = (
    f"SELECT {_ENV_COLS} {_ENV_FROM} WHERE ($1::uuid IS NULL OR e.org_id = $1) ORDER BY o.name, e.name"
)


SQL_SELECT_ENV_BY_ID = f"SELECT {_ENV_COLS} {_ENV_FROM} WHERE e.env_id = $1"


SQL_SELECT_ENV_BY_NAME = f"SELECT {_ENV_COLS} {_ENV_FROM} WHERE e.org_id = $1 AND e.name = $2"


SQL_INSERT_ENV = """
INSERT INTO environments (org_id, name, region, model_list, quota_tokens_per_day, concurrency_limit)
VALUES ($1, $2, $3, $4::text::jsonb, $5, $6)
RETURNING env_id"""


SQL_SET_ENV_STATUS = "UPDATE environments SET status = $2 WHERE env_id = $1"


async def get_env(db: Db, env: str, org: str | None = None) -> Environment:
    """An environment by UUID, or by name within `org` (names are unique only inside one org)."""
    env_uuid = as_uuid(env)
    if env_uuid is not None:
        found = _env(await fetch_one(db, f"environment {env!r} not found", SQL_SELECT_ENV_BY_ID, env_uuid))
        if org is not None and (await get_org(db, org)).org_id != found.org_id:
            raise NotFound(f"environment {env!r} does not belong to org {org!r}")
        return found
    if org is None:
        raise InvalidArgument(f"environment {env!r} is a name: give its org too (--org)")
    owner = await get_org(db, org)
    return _env(await fetch_one(db, f"environment {env!r} not found in org {owner.name!r}",
                                 SQL_SELECT_ENV_BY_NAME, uuid.UUID(owner.org_id), env))


async def list_envs(db: Db, org: str | None = None) -> list[Environment]:
    org_id = uuid.UUID((await get_org(db, org)).org_id) if org is not None else None
    return [_env(r) for r in await db.fetch(SQL_SELECT_ENVS, org_id)]


@db_errors
async def create_env(
    db: Db,
    org: str,
    name: str,
    region: str | None = None,
    model_list: Sequence[str] = (),
    quota_tokens_per_day: int | None = None,
    concurrency_limit: int | None = None,
    *,
    actor: str = "system",
) -> Environment:
    if not name.strip() or as_uuid(name):
        raise InvalidArgument("environment name must be non-empty and must not look like a UUID")
    positive(quota_tokens_per_day, "daily token quota", zero_ok=True)
    positive(concurrency_limit, "concurrency limit")
    models = unique(model_list, "model list")
    async with transaction(db) as conn:
        owner = await get_org(conn, org)
        await require_regions(conn, [region])
        await require_models(conn, models)
        if await conn.fetchrow(SQL_SELECT_ENV_BY_NAME, uuid.UUID(owner.org_id), name):
            raise Conflict(f"environment {name!r} already exists in org {owner.name!r}")
        env_id = await conn.fetchval(
            SQL_INSERT_ENV,
            uuid.UUID(owner.org_id),
            name,
            region,
            json.dumps(models),
            quota_tokens_per_day,
            concurrency_limit,
        )
        env = _env(await conn.fetchrow(SQL_SELECT_ENV_BY_ID, env_id))
        await audit(conn, actor, "env.create", "environment", env.env_id, to_json(env))
        return env


@db_errors
async def set_env_status(
    db: Db, env: str, status: str, org: str | None = None, *, actor: str = "system"
) -> Environment:
    choice(status, ENV_STATUSES, "environment status")
    async with transaction(db) as conn:
        current = await get_env(conn, env, org)
        await conn.execute(SQL_SET_ENV_STATUS, uuid.UUID(current.env_id), status)
        updated = _env(await conn.fetchrow(SQL_SELECT_ENV_BY_ID, uuid.UUID(current.env_id)))
        details = {"from": current.status, "to": status, "org_id": current.org_id}
        await audit(conn, actor, "env.set_status", "environment", updated.env_id, details)
        return updated
