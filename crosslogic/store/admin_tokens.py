"""Admin tokens: bearers of the admin API and the developer dashboard, with a role and a scope.

A token is shown once; only its HMAC (the key secret, as for API keys) is stored. Scope: `org_id` None is the
platform (every org, the catalogue, nodes, policy); otherwise one org. Roles as seed §4.9 (crosslogic/api/admin/
access.py says what each may do). Every change writes its audit_log row in the same transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from crosslogic.keys import admin_token_prefix, generate_admin_token, hash_api_key, looks_like_admin_token
from crosslogic.store.tenancy import (
    KEY_ROLES,
    Conflict,
    Db,
    InvalidArgument,
    NotFound,
    as_uuid,
    audit,
    choice,
    db_errors,
    get_org,
    to_json,
    transaction,
)

ADMIN_ROLES = KEY_ROLES  # admin, developer, read-only: the seed's three roles


@dataclass(frozen=True)
class AdminToken:
    token_id: str
    token_prefix: str
    name: str
    role: str
    org_id: str | None  # None = platform scope
    org_name: str | None
    status: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def platform(self) -> bool:
        return self.org_id is None


_COLS = """t.token_id, t.token_prefix, t.name, t.role, t.org_id, o.name AS org_name, t.status, t.created_by,
    t.created_at, t.expires_at, t.revoked_at, t.last_used_at"""
_FROM = "FROM admin_tokens t LEFT JOIN orgs o ON o.org_id = t.org_id"
SQL_INSERT_TOKEN = """
INSERT INTO admin_tokens (token_hash, token_prefix, name, role, org_id, created_by, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING token_id"""
SQL_SELECT_TOKEN_BY_ID = f"SELECT {_COLS} {_FROM} WHERE t.token_id = $1"
SQL_SELECT_TOKENS_BY_PREFIX = f"SELECT {_COLS} {_FROM} WHERE t.token_prefix = $1"
SQL_SELECT_TOKENS = f"SELECT {_COLS} {_FROM} WHERE ($1::uuid IS NULL OR t.org_id = $1) ORDER BY t.created_at"
# Authentication: a usable token only (active, not expired); last_used_at at most once a minute per token, so a
# dashboard polling every few seconds does not write a row per request.
SQL_AUTHENTICATE = f"""
WITH found AS (
    SELECT {_COLS} {_FROM}
    WHERE t.token_hash = $1 AND t.status = 'active' AND (t.expires_at IS NULL OR t.expires_at > now())
), touched AS (
    UPDATE admin_tokens SET last_used_at = now()
    WHERE token_id = (SELECT token_id FROM found)
      AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
)
SELECT * FROM found"""
SQL_REVOKE_TOKEN = "UPDATE admin_tokens SET status = 'revoked', revoked_at = now() WHERE token_id = $1"


def _token(r: asyncpg.Record) -> AdminToken:
    return AdminToken(
        token_id=str(r["token_id"]), token_prefix=r["token_prefix"], name=r["name"], role=r["role"],
        org_id=None if r["org_id"] is None else str(r["org_id"]), org_name=r["org_name"], status=r["status"],
        created_by=r["created_by"], created_at=r["created_at"], expires_at=r["expires_at"],
        revoked_at=r["revoked_at"], last_used_at=r["last_used_at"])


@db_errors
async def create_token(db: Db, secret: bytes, role: str, org: str | None = None, name: str = "", *,
                       expires_at: datetime | None = None, actor: str = "system") -> tuple[AdminToken, str]:
    """A new token (record, plaintext); `org` None = platform scope."""
    if not secret:
        raise InvalidArgument("the key secret is empty")
    choice(role, ADMIN_ROLES, "role")
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= datetime.now(UTC)):
        raise InvalidArgument("the expiry must be a future time with a time zone")
    async with transaction(db) as conn:
        org_id = None if org is None else uuid.UUID((await get_org(conn, org)).org_id)
        plaintext = generate_admin_token()
        token_id = await conn.fetchval(SQL_INSERT_TOKEN, hash_api_key(secret, plaintext),
                                       admin_token_prefix(plaintext), name, role, org_id, actor, expires_at)
        record = _token(await conn.fetchrow(SQL_SELECT_TOKEN_BY_ID, token_id))
        details = {k: v for k, v in to_json(record).items() if k in ("token_prefix", "name", "role", "org_id")}
        await audit(conn, actor, "admin_token.create", "admin_token", record.token_id, details)
        return record, plaintext


async def authenticate(db: Db, secret: bytes, token: str) -> AdminToken | None:
    """The usable token `token` is, or None (unknown, revoked, expired, or not shaped like a token)."""
    if not looks_like_admin_token(token):
        return None
    row = await db.fetchrow(SQL_AUTHENTICATE, hash_api_key(secret, token))
    return None if row is None else _token(row)


async def list_tokens(db: Db, org_id: str | None = None) -> list[AdminToken]:
    return [_token(r) for r in await db.fetch(SQL_SELECT_TOKENS, None if org_id is None else uuid.UUID(org_id))]


async def get_token(db: Db, ref: str) -> AdminToken:
    """By token_id or display prefix (if unambiguous)."""
    ref_uuid = as_uuid(ref)
    rows = [await db.fetchrow(SQL_SELECT_TOKEN_BY_ID, ref_uuid)] if ref_uuid else \
        await db.fetch(SQL_SELECT_TOKENS_BY_PREFIX, ref)
    rows = [r for r in rows if r is not None]
    if not rows:
        raise NotFound(f"admin token {ref!r} not found")
    if len(rows) > 1:
        raise Conflict(f"prefix {ref!r} matches {len(rows)} tokens: use the token_id")
    return _token(rows[0])


@db_errors
async def revoke_token(db: Db, ref: str, *, actor: str = "system") -> AdminToken:
    async with transaction(db) as conn:
        found = await get_token(conn, ref)
        if found.status == "revoked":
            raise Conflict(f"admin token {found.token_prefix} is already revoked")
        await conn.execute(SQL_REVOKE_TOKEN, uuid.UUID(found.token_id))
        await audit(conn, actor, "admin_token.revoke", "admin_token", found.token_id,
                    {"token_prefix": found.token_prefix})
        return _token(await conn.fetchrow(SQL_SELECT_TOKEN_BY_ID, uuid.UUID(found.token_id)))
