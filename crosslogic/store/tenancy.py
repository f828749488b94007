"""Tenancy and catalogue data functions: orgs, environments, API keys, models, regions, nodes.

Every function takes an asyncpg connection or pool. Parameters are always bound; the SQL lives in
named constants. Each mutation writes its audit_log row in the same transaction as the change, so
the log can never disagree with the data. jsonb columns travel as text (`::text` / `$n::text::jsonb`)
so these functions work whether or not the caller registered a JSON codec.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ParamSpec, TypeVar

import asyncpg

from crosslogic.keys import display_prefix, generate_api_key, hash_api_key, looks_like_api_key

Db = asyncpg.Connection | asyncpg.Pool | Any  # Any: pool connection proxies are not Connection subclasses

BILLING_PLANS = ("free", "serverless", "reserved", "enterprise")
ORG_STATUSES = ("active", "suspended")
ENV_STATUSES = ("active", "suspended")
KEY_ROLES = ("admin", "developer", "read-only")
MODEL_KINDS = ("chat", "completion", "embedding")
NODE_STATUSES = ("active", "draining", "dead")
MICRO = 1_000_000  # micro-dollars per dollar, and ppm per 1.0


# ---------------------------------------------------------------- errors


class TenancyError(Exception):
    """Base of the errors an operator can act on; the CLI prints them without a traceback."""


class NotFound(TenancyError):
    pass


class Conflict(TenancyError):
    pass


class InvalidArgument(TenancyError):
    pass


P = ParamSpec("P")
T = TypeVar("T")


def _db_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Constraint violations the explicit checks did not catch still surface as our error types."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except asyncpg.UniqueViolationError as e:
            raise Conflict(f"already exists: {e.detail or e}") from None
        except asyncpg.ForeignKeyViolationError as e:
            raise NotFound(f"referenced row does not exist: {e.detail or e}") from None
        except (asyncpg.CheckViolationError, asyncpg.NotNullViolationError) as e:
            raise InvalidArgument(f"invalid value ({e.constraint_name or e.column_name}): {e}") from None
        except asyncpg.DataError as e:  # out-of-range integers and the like
            raise InvalidArgument(str(e)) from None

    return wrapper


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Org:
    org_id: str
    name: str
    status: str
    billing_plan: str
    reserved_tps: int
    region_preferences: tuple[str, ...]
    created_at: datetime


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


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as operators see it: never the plaintext, never the hash."""

    key_id: str
    key_prefix: str
    org_id: str
    org_name: str
    env_id: str
    env_name: str
    name: str
    region: str | None
    role: str
    rate_limit_tokens_per_min: int | None
    status: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Model:
    model_id: str
    kind: str
    served_name: str | None
    context_length: int
    max_output_tokens: int
    default_max_tokens: int
    vram_gb: int
    tokens_per_sec: int
    input_price_microdollars_per_1m: int
    output_price_microdollars_per_1m: int
    status: str
    created_at: datetime
    max_n: int  # most choices (n, best_of) one request may ask for


@dataclass(frozen=True)
class Region:
    region_id: str
    display_name: str
    fallback_chain: tuple[str, ...]
    price_multiplier_ppm: int
    status: str
    created_at: datetime


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
    status: str
    weight: int
    last_heartbeat_at: datetime | None
    created_at: datetime


def to_json(record: Any) -> dict[str, Any]:
    """A record as JSON-ready primitives (datetimes as ISO 8601, tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.isoformat()
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in asdict(record).items()}


def _id(v: Any) -> str | None:
    return None if v is None else str(v)


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


def _key(r: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=str(r["key_id"]),
        key_prefix=r["key_prefix"],
        org_id=str(r["org_id"]),
        org_name=r["org_name"],
        env_id=str(r["env_id"]),
        env_name=r["env_name"],
        name=r["name"],
        region=r["region"],
        role=r["role"],
        rate_limit_tokens_per_min=r["rate_limit_tokens_per_min"],
        status=r["status"],
        created_at=r["created_at"],
        revoked_at=r["revoked_at"],
    )


def _model(r: asyncpg.Record) -> Model:
    return Model(**{f: r[f] for f in Model.__dataclass_fields__})


def _region(r: asyncpg.Record) -> Region:
    return Region(
        region_id=r["region_id"],
        display_name=r["display_name"],
        fallback_chain=tuple(r["fallback_chain"]),
        price_multiplier_ppm=r["price_multiplier_ppm"],
        status=r["status"],
        created_at=r["created_at"],
    )


def _node(r: asyncpg.Record) -> Node:
    fields = {f: r[f] for f in Node.__dataclass_fields__}
    fields.update(
        node_id=str(r["node_id"]),
        model_list=tuple(r["model_list"]),
        reserved_org_id=_id(r["reserved_org_id"]),
    )
    return Node(**fields)


# ---------------------------------------------------------------- SQL

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

_KEY_COLS = """k.key_id, k.key_prefix, k.org_id, o.name AS org_name, k.env_id, e.name AS env_name, k.name,
    k.region, k.role, k.rate_limit_tokens_per_min, k.status, k.created_at, k.revoked_at, k.user_id"""
_KEY_FROM = "FROM api_keys k JOIN orgs o ON o.org_id = k.org_id JOIN environments e ON e.env_id = k.env_id"
SQL_SELECT_KEYS = f"""SELECT {_KEY_COLS} {_KEY_FROM}
WHERE ($1::uuid IS NULL OR k.org_id = $1) AND ($2::uuid IS NULL OR k.env_id = $2)
ORDER BY o.name, e.name, k.created_at"""
SQL_SELECT_KEY_BY_ID = f"SELECT {_KEY_COLS} {_KEY_FROM} WHERE k.key_id = $1"
SQL_SELECT_KEYS_BY_PREFIX = f"SELECT {_KEY_COLS} {_KEY_FROM} WHERE k.key_prefix = $1"
SQL_SELECT_KEY_BY_HASH = f"SELECT {_KEY_COLS} {_KEY_FROM} WHERE k.key_hash = $1"
# Row lock: two concurrent rotations of one key must not both succeed.
SQL_LOCK_KEY = "SELECT key_id, status FROM api_keys WHERE key_id = $1 FOR UPDATE"
SQL_INSERT_KEY = """
INSERT INTO api_keys (key_hash, key_prefix, org_id, env_id, user_id, name, region, role,
    rate_limit_tokens_per_min)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING key_id"""
SQL_REVOKE_KEY = "UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE key_id = $1"

_MODEL_COLS = """model_id, kind, served_name, context_length, max_output_tokens, default_max_tokens, vram_gb,
    tokens_per_sec, input_price_microdollars_per_1m, output_price_microdollars_per_1m, status, created_at, max_n"""
SQL_SELECT_MODELS = f"SELECT {_MODEL_COLS} FROM models ORDER BY model_id"
SQL_SELECT_MODEL = f"SELECT {_MODEL_COLS} FROM models WHERE model_id = $1"
SQL_SELECT_MODEL_IDS = "SELECT model_id FROM models WHERE model_id = ANY($1::text[])"
# Upsert where NULL means "keep what is there" (or the schema default for a new model): re-running
# `model add` with one flag changes one field. The COALESCE defaults mirror 001's (and 006's) column defaults.
SQL_UPSERT_MODEL = f"""
INSERT INTO models AS m (model_id, kind, served_name, context_length, max_output_tokens, default_max_tokens,
    vram_gb, tokens_per_sec, input_price_microdollars_per_1m, output_price_microdollars_per_1m, max_n)
VALUES ($1, COALESCE($2::text, 'chat'), $3::text, COALESCE($4::int, 8192), COALESCE($5::int, 4096),
    COALESCE($6::int, 512), COALESCE($7::int, 16), COALESCE($8::int, 1000), COALESCE($9::bigint, 0),
    COALESCE($10::bigint, 0), COALESCE($11::int, 128))
ON CONFLICT (model_id) DO UPDATE SET
    max_n = COALESCE($11, m.max_n),
    kind = COALESCE($2, m.kind),
    served_name = COALESCE($3, m.served_name),
    context_length = COALESCE($4, m.context_length),
    max_output_tokens = COALESCE($5, m.max_output_tokens),
    default_max_tokens = COALESCE($6, m.default_max_tokens),
    vram_gb = COALESCE($7, m.vram_gb),
    tokens_per_sec = COALESCE($8, m.tokens_per_sec),
    input_price_microdollars_per_1m = COALESCE($9, m.input_price_microdollars_per_1m),
    output_price_microdollars_per_1m = COALESCE($10, m.output_price_microdollars_per_1m)
RETURNING {_MODEL_COLS}"""

_REGION_COLS = "region_id, display_name, fallback_chain, price_multiplier_ppm, status, created_at"
SQL_SELECT_REGIONS = f"SELECT {_REGION_COLS} FROM regions ORDER BY region_id"
SQL_SELECT_REGION = f"SELECT {_REGION_COLS} FROM regions WHERE region_id = $1"
SQL_UPSERT_REGION = f"""
INSERT INTO regions AS r (region_id, display_name, fallback_chain, price_multiplier_ppm)
VALUES ($1::text, COALESCE($2::text, $1::text), COALESCE($3::text[], '{{}}'), COALESCE($4::int, 1000000))
ON CONFLICT (region_id) DO UPDATE SET
    display_name = COALESCE($2, r.display_name),
    fallback_chain = COALESCE($3::text[], r.fallback_chain),
    price_multiplier_ppm = COALESCE($4, r.price_multiplier_ppm)
RETURNING {_REGION_COLS}"""

_NODE_COLS = """node_id, name, region, model_list, endpoint_host, endpoint_port, cloud, spot, gpu_type,
    reserved_org_id, status, weight, last_heartbeat_at, created_at"""
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
SQL_SET_NODE_STATUS = f"UPDATE nodes SET status = $2 WHERE node_id = $1 RETURNING {_NODE_COLS}"
SQL_DELETE_NODE = "DELETE FROM nodes WHERE node_id = $1"

SQL_INSERT_AUDIT = """
INSERT INTO audit_log (actor, action, target_type, target_id, details)
VALUES ($1, $2, $3, $4, $5::text::jsonb)"""


# ---------------------------------------------------------------- helpers


@asynccontextmanager
async def _transaction(db: Db) -> AsyncIterator[asyncpg.Connection]:
    """One transaction on one connection; inside a caller's transaction this becomes a savepoint."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db


async def _audit(conn: Any, actor: str, action: str, target_type: str, target_id: str, details: dict) -> None:
    await conn.execute(
        SQL_INSERT_AUDIT, actor, action, target_type, target_id, json.dumps(details, default=str)
    )


def _as_uuid(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except (ValueError, AttributeError, TypeError):
        return None


def _choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise InvalidArgument(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _positive(value: int | None, what: str, *, zero_ok: bool = False) -> int | None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise InvalidArgument(f"{what} must be {'>= 0' if zero_ok else '> 0'}, not {value}")
    return value


def _exact_units(value: str | int | Decimal, unit: int, what: str) -> int:
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidArgument(f"{what}: {value!r} is not a number") from None
    if not d.is_finite() or d < 0:
        raise InvalidArgument(f"{what}: {value!r} must be a finite, non-negative number")
    scaled = d * unit
    if scaled != scaled.to_integral_value():
        raise InvalidArgument(f"{what}: {value!r} has more precision than 1/{unit:,} allows")
    return int(scaled)


def dollars_to_microdollars(value: str | int | Decimal) -> int:
    """'0.05' (dollars per 1M tokens) -> 50000, exactly; rejects anything finer than one micro-dollar."""
    return _exact_units(value, MICRO, "price")


def multiplier_to_ppm(value: str | int | Decimal) -> int:
    """'1.2' -> 1200000 parts per million; rejects zero and anything finer than 1 ppm."""
    ppm = _exact_units(value, MICRO, "price multiplier")
    if ppm == 0:
        raise InvalidArgument("price multiplier must be > 0")
    return ppm


def microdollars_to_dollars(micro: int) -> str:
    return format(Decimal(micro) / MICRO, "f")


def ppm_to_multiplier(ppm: int) -> str:
    return format((Decimal(ppm) / MICRO).normalize(), "f")


async def _require_regions(db: Db, regions: Iterable[str | None]) -> None:
    for region in regions:
        if region is not None and await db.fetchrow(SQL_SELECT_REGION, region) is None:
            raise NotFound(f"region {region!r} not found")


async def _require_models(db: Db, models: Sequence[str]) -> None:
    known = {r["model_id"] for r in await db.fetch(SQL_SELECT_MODEL_IDS, list(models))}
    missing = [m for m in models if m not in known]
    if missing:
        raise NotFound(f"model(s) not found: {', '.join(missing)}")


def _unique(items: Iterable[str], what: str) -> list[str]:
    out = [i.strip() for i in items if i.strip()]
    if len(set(out)) != len(out):
        raise InvalidArgument(f"{what} lists an entry twice: {out}")
    return out


# ---------------------------------------------------------------- orgs


async def list_orgs(db: Db) -> list[Org]:
    return [_org(r) for r in await db.fetch(SQL_SELECT_ORGS)]


async def _fetch_one(db: Db, not_found: str, sql: str, *args: Any) -> asyncpg.Record:
    """The one row `sql` finds, or NotFound(not_found)."""
    row = await db.fetchrow(sql, *args)
    if row is None:
        raise NotFound(not_found)
    return row


async def get_org(db: Db, ref: str) -> Org:
    """An org by UUID or by name."""
    return _org(await _fetch_one(db, f"org {ref!r} not found", SQL_SELECT_ORG_BY_REF, ref, _as_uuid(ref)))


@_db_errors
async def create_org(
    db: Db,
    name: str,
    billing_plan: str = "serverless",
    region_preferences: Sequence[str] = (),
    reserved_tps: int = 0,
    *,
    actor: str = "system",
) -> Org:
    if not name.strip() or _as_uuid(name):
        raise InvalidArgument("org name must be non-empty and must not look like a UUID")
    _choice(billing_plan, BILLING_PLANS, "billing plan")
    _positive(reserved_tps, "reserved tokens/s", zero_ok=True)
    prefs = _unique(region_preferences, "region preferences")
    async with _transaction(db) as conn:
        await _require_regions(conn, prefs)
        if await conn.fetchrow(SQL_SELECT_ORG_BY_REF, name, None):
            raise Conflict(f"org {name!r} already exists")
        org = _org(await conn.fetchrow(SQL_INSERT_ORG, name, billing_plan, json.dumps(prefs), reserved_tps))
        await _audit(conn, actor, "org.create", "org", org.org_id, to_json(org))
        return org


@_db_errors
async def set_org_status(db: Db, org: str, status: str, *, actor: str = "system") -> Org:
    _choice(status, ORG_STATUSES, "org status")
    async with _transaction(db) as conn:
        current = await get_org(conn, org)
        updated = _org(await conn.fetchrow(SQL_SET_ORG_STATUS, uuid.UUID(current.org_id), status))
        await _audit(
            conn, actor, "org.set_status", "org", updated.org_id, {"from": current.status, "to": status}
        )
        return updated


# ---------------------------------------------------------------- environments


async def get_env(db: Db, env: str, org: str | None = None) -> Environment:
    """An environment by UUID, or by name within `org` (names are unique only inside one org)."""
    env_uuid = _as_uuid(env)
    if env_uuid is not None:
        found = _env(await _fetch_one(db, f"environment {env!r} not found", SQL_SELECT_ENV_BY_ID, env_uuid))
        if org is not None and (await get_org(db, org)).org_id != found.org_id:
            raise NotFound(f"environment {env!r} does not belong to org {org!r}")
        return found
    if org is None:
        raise InvalidArgument(f"environment {env!r} is a name: give its org too (--org)")
    owner = await get_org(db, org)
    return _env(await _fetch_one(db, f"environment {env!r} not found in org {owner.name!r}",
                                 SQL_SELECT_ENV_BY_NAME, uuid.UUID(owner.org_id), env))


async def list_envs(db: Db, org: str | None = None) -> list[Environment]:
    org_id = uuid.UUID((await get_org(db, org)).org_id) if org is not None else None
    return [_env(r) for r in await db.fetch(SQL_SELECT_ENVS, org_id)]


@_db_errors
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
    if not name.strip() or _as_uuid(name):
        raise InvalidArgument("environment name must be non-empty and must not look like a UUID")
    _positive(quota_tokens_per_day, "daily token quota", zero_ok=True)
    _positive(concurrency_limit, "concurrency limit")
    models = _unique(model_list, "model list")
    async with _transaction(db) as conn:
        owner = await get_org(conn, org)
        await _require_regions(conn, [region])
        await _require_models(conn, models)
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
        await _audit(conn, actor, "env.create", "environment", env.env_id, to_json(env))
        return env


@_db_errors
async def set_env_status(
    db: Db, env: str, status: str, org: str | None = None, *, actor: str = "system"
) -> Environment:
    _choice(status, ENV_STATUSES, "environment status")
    async with _transaction(db) as conn:
        current = await get_env(conn, env, org)
        await conn.execute(SQL_SET_ENV_STATUS, uuid.UUID(current.env_id), status)
        updated = _env(await conn.fetchrow(SQL_SELECT_ENV_BY_ID, uuid.UUID(current.env_id)))
        details = {"from": current.status, "to": status, "org_id": current.org_id}
        await _audit(conn, actor, "env.set_status", "environment", updated.env_id, details)
        return updated


# ---------------------------------------------------------------- API keys


async def list_keys(db: Db, org: str | None = None, env: str | None = None) -> list[ApiKeyRecord]:
    org_id = env_id = None
    if env is not None:
        found = await get_env(db, env, org)
        org_id, env_id = uuid.UUID(found.org_id), uuid.UUID(found.env_id)
    elif org is not None:
        org_id = uuid.UUID((await get_org(db, org)).org_id)
    return [_key(r) for r in await db.fetch(SQL_SELECT_KEYS, org_id, env_id)]


async def get_key(db: Db, ref: str, *, secret: bytes | None = None) -> ApiKeyRecord:
    """A key by key_id, by display prefix (if unambiguous), or by its plaintext (needs the secret)."""
    if (key_uuid := _as_uuid(ref)) is not None:
        rows = [await db.fetchrow(SQL_SELECT_KEY_BY_ID, key_uuid)]
    elif looks_like_api_key(ref):
        if secret is None:
            raise InvalidArgument("finding a key by its plaintext needs the key secret")
        rows = [await db.fetchrow(SQL_SELECT_KEY_BY_HASH, hash_api_key(secret, ref))]
    else:
        rows = await db.fetch(SQL_SELECT_KEYS_BY_PREFIX, ref)
    rows = [r for r in rows if r is not None]
    if not rows:
        raise NotFound(f"API key {ref!r} not found")
    if len(rows) > 1:
        raise Conflict(f"prefix {ref!r} matches {len(rows)} keys: use the key_id")
    return _key(rows[0])


async def _insert_key(
    conn: Any,
    secret: bytes,
    org_id: uuid.UUID,
    env_id: uuid.UUID,
    user_id: Any,
    name: str,
    region: str | None,
    role: str,
    rate_limit: int | None,
) -> tuple[ApiKeyRecord, str]:
    plaintext = generate_api_key()
    key_id = await conn.fetchval(
        SQL_INSERT_KEY, hash_api_key(secret, plaintext), display_prefix(plaintext),
        org_id, env_id, user_id, name, region, role, rate_limit,
    )  # fmt: skip
    return _key(await conn.fetchrow(SQL_SELECT_KEY_BY_ID, key_id)), plaintext


def _key_audit(record: ApiKeyRecord) -> dict:
    # Only what the listing shows: the audit log must never become a place to find key material.
    return {k: v for k, v in to_json(record).items() if k not in ("created_at", "revoked_at")}


@_db_errors
async def create_key(
    db: Db,
    secret: bytes,
    org: str | None,
    env: str,
    name: str = "",
    region: str | None = None,
    role: str = "developer",
    rate_limit_tokens_per_min: int | None = None,
    *,
    actor: str = "system",
    allow_suspended: bool = False,
) -> tuple[ApiKeyRecord, str]:
    """A new key; returns its record and the plaintext, which exists nowhere else afterwards.

    Refuses (Conflict) when the org or the environment is suspended: the gateway would refuse the key with
    403 tenant_suspended, and handing out a key that cannot work is a silent trap. `allow_suspended` creates
    it anyway (it starts working when both are active again)."""
    if not secret:
        raise InvalidArgument("the key secret is empty")
    _choice(role, KEY_ROLES, "role")
    _positive(rate_limit_tokens_per_min, "rate limit (tokens/min)")
    async with _transaction(db) as conn:
        owner_env = await get_env(conn, env, org)
        suspended = await _suspended(conn, owner_env)
        if suspended and not allow_suspended:
            raise Conflict(f"{suspended} is suspended: a key created now would be refused (403 tenant_suspended) "
                           "until it is resumed. Resume it first (crosslogic org resume / env resume), or pass "
                           "--allow-suspended to create the key anyway")
        await _require_regions(conn, [region])
        record, plaintext = await _insert_key(
            conn, secret, uuid.UUID(owner_env.org_id), uuid.UUID(owner_env.env_id), None,
            name, region, role, rate_limit_tokens_per_min,
        )  # fmt: skip
        await _audit(conn, actor, "key.create", "api_key", record.key_id, _key_audit(record))
        return record, plaintext


async def _suspended(db: Db, env: Environment) -> str | None:
    """Which owner of keys in `env` is suspended ("org 'acme'", "environment 'prod' of org 'acme'"), if any."""
    org = await get_org(db, env.org_id)
    if org.status == "suspended":
        return f"org {org.name!r}"
    if env.status == "suspended":
        return f"environment {env.name!r} of org {org.name!r}"
    return None


async def suspended_owner(db: Db, key: ApiKeyRecord) -> str | None:
    """The suspended org or environment that makes `key` unusable, or None."""
    return await _suspended(db, await get_env(db, key.env_id))


@_db_errors
async def revoke_key(db: Db, key: str, *, secret: bytes | None = None, actor: str = "system") -> ApiKeyRecord:
    async with _transaction(db) as conn:
        found = await get_key(conn, key, secret=secret)
        row = await conn.fetchrow(SQL_LOCK_KEY, uuid.UUID(found.key_id))
        if row["status"] == "revoked":
            raise Conflict(f"API key {found.key_prefix} ({found.key_id}) is already revoked")
        await conn.execute(SQL_REVOKE_KEY, row["key_id"])
        await _audit(conn, actor, "key.revoke", "api_key", found.key_id, {"key_prefix": found.key_prefix})
        return _key(await conn.fetchrow(SQL_SELECT_KEY_BY_ID, row["key_id"]))


@_db_errors
async def rotate_key(db: Db, secret: bytes, key: str, *, actor: str = "system") -> tuple[ApiKeyRecord, str]:
    """Replace a key by a new one with the same attributes; the old one is revoked in the same transaction."""
    if not secret:
        raise InvalidArgument("the key secret is empty")
    async with _transaction(db) as conn:
        found = await get_key(conn, key, secret=secret)
        lock = await conn.fetchrow(SQL_LOCK_KEY, uuid.UUID(found.key_id))
        if lock["status"] == "revoked":
            raise Conflict(f"API key {found.key_prefix} ({found.key_id}) is revoked and cannot be rotated")
        old = await conn.fetchrow(SQL_SELECT_KEY_BY_ID, lock["key_id"])
        record, plaintext = await _insert_key(
            conn, secret, old["org_id"], old["env_id"], old["user_id"], old["name"], old["region"],
            old["role"], old["rate_limit_tokens_per_min"],
        )  # fmt: skip
        await conn.execute(SQL_REVOKE_KEY, lock["key_id"])
        details = {"replaced_by": record.key_id, "new_key_prefix": record.key_prefix}
        await _audit(conn, actor, "key.rotate", "api_key", found.key_id, details)
        await _audit(conn, actor, "key.create", "api_key", record.key_id, _key_audit(record))
        return record, plaintext


# ---------------------------------------------------------------- models


async def list_models(db: Db) -> list[Model]:
    return [_model(r) for r in await db.fetch(SQL_SELECT_MODELS)]


async def get_model(db: Db, model_id: str) -> Model:
    return _model(await _fetch_one(db, f"model {model_id!r} not found", SQL_SELECT_MODEL, model_id))


@_db_errors
async def add_model(
    db: Db,
    model_id: str,
    kind: str | None = None,
    served_name: str | None = None,
    context_length: int | None = None,
    max_output_tokens: int | None = None,
    default_max_tokens: int | None = None,
    vram_gb: int | None = None,
    tokens_per_sec: int | None = None,
    input_price_microdollars_per_1m: int | None = None,
    output_price_microdollars_per_1m: int | None = None,
    max_n: int | None = None,
    *,
    actor: str = "system",
    must_exist: bool = False,
) -> Model:
    """Create or update a model; arguments left as None keep their current (or default) value.
    `must_exist`: only update (`model update`), NotFound for an unknown model instead of creating it."""
    if not model_id.strip():
        raise InvalidArgument("model id must be non-empty")
    if kind is not None:
        _choice(kind, MODEL_KINDS, "model kind")
    for value, what in (
        (context_length, "context length"),
        (max_output_tokens, "max output tokens"),
        (default_max_tokens, "default max tokens"),
        (tokens_per_sec, "tokens/s"),
        (max_n, "max n (choices per request)"),
    ):
        _positive(value, what)
    _positive(vram_gb, "VRAM (GB)", zero_ok=True)
    _positive(input_price_microdollars_per_1m, "input price", zero_ok=True)
    _positive(output_price_microdollars_per_1m, "output price", zero_ok=True)
    async with _transaction(db) as conn:
        if must_exist:
            await get_model(conn, model_id)
        row = await conn.fetchrow(
            SQL_UPSERT_MODEL, model_id, kind, served_name, context_length, max_output_tokens,
            default_max_tokens, vram_gb, tokens_per_sec, input_price_microdollars_per_1m,
            output_price_microdollars_per_1m, max_n,
        )  # fmt: skip
        model = _model(row)
        if model.default_max_tokens > model.max_output_tokens:
            raise InvalidArgument(
                f"default max tokens ({model.default_max_tokens}) exceeds max output tokens "
                f"({model.max_output_tokens})"
            )  # raising here rolls the upsert back
        await _audit(conn, actor, "model.upsert", "model", model.model_id, to_json(model))
        return model


# ---------------------------------------------------------------- regions


async def list_regions(db: Db) -> list[Region]:
    return [_region(r) for r in await db.fetch(SQL_SELECT_REGIONS)]


async def get_region(db: Db, region_id: str) -> Region:
    return _region(await _fetch_one(db, f"region {region_id!r} not found", SQL_SELECT_REGION, region_id))


@_db_errors
async def add_region(
    db: Db,
    region_id: str,
    display_name: str | None = None,
    fallback_chain: Sequence[str] | None = None,
    price_multiplier_ppm: int | None = None,
    *,
    actor: str = "system",
) -> Region:
    """Create or update a region. Fallback regions may not exist yet (a chain is declared before its
    members are), but a region cannot fall back to itself."""
    if not region_id.strip():
        raise InvalidArgument("region id must be non-empty")
    chain = None if fallback_chain is None else _unique(fallback_chain, "fallback chain")
    if chain and region_id in chain:
        raise InvalidArgument(f"region {region_id!r} cannot fall back to itself")
    _positive(price_multiplier_ppm, "price multiplier (ppm)")
    async with _transaction(db) as conn:
        region = _region(
            await conn.fetchrow(SQL_UPSERT_REGION, region_id, display_name, chain, price_multiplier_ppm)
        )
        await _audit(conn, actor, "region.upsert", "region", region.region_id, to_json(region))
        return region


# ---------------------------------------------------------------- nodes


async def list_nodes(db: Db, region: str | None = None) -> list[Node]:
    return [_node(r) for r in await db.fetch(SQL_SELECT_NODES, region)]


async def get_node(db: Db, ref: str) -> Node:
    """A node by name or UUID."""
    return _node(await _fetch_one(db, f"node {ref!r} not found", SQL_SELECT_NODE_BY_REF, ref, _as_uuid(ref)))


@_db_errors
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
    models = None if model_list is None else _unique(model_list, "model list")
    async with _transaction(db) as conn:
        await _require_regions(conn, [region])
        if models:
            await _require_models(conn, models)
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
        await _audit(conn, actor, "node.upsert", "node", node.node_id, to_json(node))
        return node


@_db_errors
async def set_node_status(db: Db, node: str, status: str, *, actor: str = "system") -> Node:
    _choice(status, NODE_STATUSES, "node status")
    async with _transaction(db) as conn:
        current = await get_node(conn, node)
        updated = _node(await conn.fetchrow(SQL_SET_NODE_STATUS, uuid.UUID(current.node_id), status))
        await _audit(
            conn, actor, "node.set_status", "node", updated.node_id, {"from": current.status, "to": status}
        )
        return updated


@_db_errors
async def remove_node(db: Db, node: str, *, actor: str = "system") -> Node:
    async with _transaction(db) as conn:
        current = await get_node(conn, node)
        await conn.execute(SQL_DELETE_NODE, uuid.UUID(current.node_id))
        await _audit(conn, actor, "node.remove", "node", current.node_id, to_json(current))
        return current
