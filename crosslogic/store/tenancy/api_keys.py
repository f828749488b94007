"""API keys: create (shown once; only an HMAC is stored), list, look up, revoke, rotate."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from crosslogic.keys import KEY_MODES, display_prefix, generate_api_key, hash_api_key, looks_like_api_key
from crosslogic.store.tenancy.common import (
    Conflict,
    Db,
    InvalidArgument,
    NotFound,
    as_uuid,
    audit,
    choice,
    db_errors,
    positive,
    to_json,
    transaction,
)
from crosslogic.store.tenancy.environments import Environment, get_env
from crosslogic.store.tenancy.orgs import get_org
from crosslogic.store.tenancy.regions import require_regions

KEY_ROLES = ("admin", "developer", "read-only")


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
    expires_at: datetime | None = None  # stops working then (expiry, or the end of a rotation's overlap)
    mode: str = "live"  # "test": free, capped by test_key_limits, its usage never billed (migration 012)


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
        expires_at=r["expires_at"],
        mode=r["mode"],
    )


_KEY_COLS = """k.key_id, k.key_prefix, k.org_id, o.name AS org_name, k.env_id, e.name AS env_name, k.name,
    k.region, k.role, k.rate_limit_tokens_per_min, k.status, k.created_at, k.revoked_at, k.user_id, k.expires_at,
    k.mode"""


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
    rate_limit_tokens_per_min, expires_at, mode)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
RETURNING key_id"""


SQL_REVOKE_KEY = "UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE key_id = $1"
# The end of a rotation's overlap: the old key works until then (never later than an expiry it already had).
SQL_EXPIRE_KEY = """
UPDATE api_keys SET expires_at = LEAST(coalesce(expires_at, 'infinity'), now() + make_interval(secs => $2))
WHERE key_id = $1"""
# Longest overlap a rotation may keep the old key alive: a week is enough to roll any deployment.
MAX_ROTATION_OVERLAP_S = 7 * 24 * 3600


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
    if (key_uuid := as_uuid(ref)) is not None:
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
    expires_at: datetime | None = None,
    mode: str = "live",
) -> tuple[ApiKeyRecord, str]:
    plaintext = generate_api_key(mode)
    key_id = await conn.fetchval(
        SQL_INSERT_KEY, hash_api_key(secret, plaintext), display_prefix(plaintext),
        org_id, env_id, user_id, name, region, role, rate_limit, expires_at, mode,
    )  # fmt: skip
    return _key(await conn.fetchrow(SQL_SELECT_KEY_BY_ID, key_id)), plaintext


def _key_audit(record: ApiKeyRecord) -> dict:
    # Only what the listing shows: the audit log must never become a place to find key material.
    return {k: v for k, v in to_json(record).items() if k not in ("created_at", "revoked_at")}


def _check_expiry(expires_at: datetime | None) -> None:
    if expires_at is None:
        return
    if expires_at.tzinfo is None:
        raise InvalidArgument("the expiry needs a time zone (e.g. 2027-01-01T00:00:00+00:00)")
    if expires_at <= datetime.now(UTC):
        raise InvalidArgument("the expiry must be in the future")


@db_errors
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
    expires_at: datetime | None = None,
    mode: str = "live",
) -> tuple[ApiKeyRecord, str]:
    """A new key; returns its record and the plaintext, which exists nowhere else afterwards.

    Refuses (Conflict) when the org or the environment is suspended: the gateway would refuse the key with
    403 tenant_suspended, and handing out a key that cannot work is a silent trap. `allow_suspended` creates
    it anyway (it starts working when both are active again)."""
    if not secret:
        raise InvalidArgument("the key secret is empty")
    choice(role, KEY_ROLES, "role")
    choice(mode, KEY_MODES, "mode")
    positive(rate_limit_tokens_per_min, "rate limit (tokens/min)")
    _check_expiry(expires_at)
    async with transaction(db) as conn:
        owner_env = await get_env(conn, env, org)
        suspended = await _suspended(conn, owner_env)
        if suspended and not allow_suspended:
            raise Conflict(f"{suspended} is suspended: a key created now would be refused (403 tenant_suspended) "
                           "until it is resumed. Resume it first (crosslogic org resume / env resume), or pass "
                           "--allow-suspended to create the key anyway")
        await require_regions(conn, [region])
        record, plaintext = await _insert_key(
            conn, secret, uuid.UUID(owner_env.org_id), uuid.UUID(owner_env.env_id), None,
            name, region, role, rate_limit_tokens_per_min, expires_at, mode,
        )  # fmt: skip
        await audit(conn, actor, "key.create", "api_key", record.key_id, _key_audit(record))
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


@db_errors
async def revoke_key(db: Db, key: str, *, secret: bytes | None = None, actor: str = "system") -> ApiKeyRecord:
    async with transaction(db) as conn:
        found = await get_key(conn, key, secret=secret)
        row = await conn.fetchrow(SQL_LOCK_KEY, uuid.UUID(found.key_id))
        if row["status"] == "revoked":
            raise Conflict(f"API key {found.key_prefix} ({found.key_id}) is already revoked")
        await conn.execute(SQL_REVOKE_KEY, row["key_id"])
        await audit(conn, actor, "key.revoke", "api_key", found.key_id, {"key_prefix": found.key_prefix})
        return _key(await conn.fetchrow(SQL_SELECT_KEY_BY_ID, row["key_id"]))


@db_errors
async def rotate_key(db: Db, secret: bytes, key: str, *, actor: str = "system",
                     overlap_s: int = 0) -> tuple[ApiKeyRecord, str]:
    """Replace a key by a new one with the same attributes (expiry and mode too), in one transaction.

    overlap_s = 0 revokes the old key at once (a leaked key); otherwise the old key keeps working for
    overlap_s seconds (its expires_at), so clients switch to the new one without a failed request."""
    if not secret:
        raise InvalidArgument("the key secret is empty")
    if not 0 <= overlap_s <= MAX_ROTATION_OVERLAP_S:
        raise InvalidArgument(f"the overlap must be between 0 and {MAX_ROTATION_OVERLAP_S} seconds, not {overlap_s}")
    async with transaction(db) as conn:
        found = await get_key(conn, key, secret=secret)
        lock = await conn.fetchrow(SQL_LOCK_KEY, uuid.UUID(found.key_id))
        if lock["status"] == "revoked":
            raise Conflict(f"API key {found.key_prefix} ({found.key_id}) is revoked and cannot be rotated")
        old = await conn.fetchrow(SQL_SELECT_KEY_BY_ID, lock["key_id"])
        record, plaintext = await _insert_key(
            conn, secret, old["org_id"], old["env_id"], old["user_id"], old["name"], old["region"],
            old["role"], old["rate_limit_tokens_per_min"], old["expires_at"], old["mode"],
        )  # fmt: skip
        if overlap_s:
            await conn.execute(SQL_EXPIRE_KEY, lock["key_id"], overlap_s)
        else:
            await conn.execute(SQL_REVOKE_KEY, lock["key_id"])
        details = {"replaced_by": record.key_id, "new_key_prefix": record.key_prefix, "overlap_s": overlap_s}
        await audit(conn, actor, "key.rotate", "api_key", found.key_id, details)
        await audit(conn, actor, "key.create", "api_key", record.key_id, _key_audit(record))
        return record, plaintext
