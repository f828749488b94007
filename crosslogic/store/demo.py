"""Demo tenancy for `crosslogic up`: regions, two models, org `demo` / env `dev`, nodes and a usable key.

Idempotent: catalogue rows are created only when missing (an operator's later edits survive), nodes
are upserted, and the demo key is created once and rotated on every later run, because a plaintext key
can be shown only when it is made and the caller always needs one that works.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import asyncpg

from crosslogic.store import admin_tokens
from crosslogic.store import tenancy as t

DEMO_ORG = "demo"
DEMO_ENV = "dev"
DEMO_KEY_NAME = "demo"
DEMO_PLATFORM_TOKEN = "demo-platform-admin"
DEMO_ORG_TOKEN = "demo-org-admin"
DEMO_REGION = "ap-south"
ACTOR = "seed-demo"
T = TypeVar("T")
# Serialises concurrent seeders (two `crosslogic up` racing on one database).
_SEED_LOCK_ID = 7_271_002

REGIONS: list[tuple[str, str, list[str]]] = [
    ("ap-south", "Mumbai", ["ap-southeast", "eu-central", "us-east"]),
    ("ap-southeast", "Singapore", ["ap-south", "eu-central", "us-east"]),
    ("eu-central", "Frankfurt", ["us-east", "ap-south"]),
    ("us-east", "Virginia", ["eu-central", "ap-south"]),
]
MODELS: list[dict[str, Any]] = [
    dict(
        model_id="llama-3-8b",
        kind="chat",
        max_output_tokens=4096,
        default_max_tokens=512,
        input_price_microdollars_per_1m=t.dollars_to_microdollars("0.05"),
        output_price_microdollars_per_1m=t.dollars_to_microdollars("0.08"),
    ),
    dict(
        model_id="bge-small",
        kind="embedding",
        context_length=512,
        max_output_tokens=1,
        default_max_tokens=1,
        input_price_microdollars_per_1m=t.dollars_to_microdollars("0.01"),
        output_price_microdollars_per_1m=0,
    ),
]


async def seed_demo(pool_or_conn: Any, secret: bytes, nodes: list[tuple]) -> dict:
    """Create (or refresh) the demo tenancy; returns {"api_key", "org_id", "env_id", "key_id", "admin_token",
    "org_admin_token"}."""
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            return await _seed(conn, secret, nodes)
    return await _seed(pool_or_conn, secret, nodes)


async def _seed(conn: Any, secret: bytes, nodes: list[tuple]) -> dict:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SEED_LOCK_ID)
        for region_id, display_name, fallback in REGIONS:
            if await _maybe(t.get_region(conn, region_id)) is None:
                await t.add_region(conn, region_id, display_name, fallback, actor=ACTOR)
        for model in MODELS:
            if await _maybe(t.get_model(conn, model["model_id"])) is None:
                await t.add_model(conn, **model, actor=ACTOR)

        # A suspended demo org or env would make the returned key useless: reactivate them.
        org = await _maybe(t.get_org(conn, DEMO_ORG))
        if org is None:
            org = await t.create_org(conn, DEMO_ORG, "serverless", [DEMO_REGION], actor=ACTOR)
        elif org.status != "active":
            org = await t.set_org_status(conn, org.org_id, "active", actor=ACTOR)
        env = await _maybe(t.get_env(conn, DEMO_ENV, org.org_id))
        if env is None:
            env = await t.create_env(conn, org.org_id, DEMO_ENV, DEMO_REGION, actor=ACTOR)
        elif env.status != "active":
            env = await t.set_env_status(conn, env.env_id, "active", actor=ACTOR)

        every_model = [m["model_id"] for m in MODELS]
        for name, host, port, *served in nodes:  # an optional 4th element lists the node's models
            await t.add_node(conn, name, DEMO_REGION, host, port, served[0] if served else every_model, actor=ACTOR)

        demo_keys = [
            k
            for k in await t.list_keys(conn, org.org_id, env.env_id)
            if k.name == DEMO_KEY_NAME and k.status == "active"
        ]
        if demo_keys:
            record, plaintext = await t.rotate_key(conn, secret, demo_keys[0].key_id, actor=ACTOR)
            for extra in demo_keys[1:]:  # keep exactly one active demo key
                await t.revoke_key(conn, extra.key_id, actor=ACTOR)
        else:
            record, plaintext = await t.create_key(
                conn, secret, org.org_id, env.env_id, DEMO_KEY_NAME, actor=ACTOR
            )
        tokens = await _demo_tokens(conn, secret, org.org_id)
        return {"api_key": plaintext, "org_id": org.org_id, "env_id": env.env_id, "key_id": record.key_id,
                **tokens}


async def _demo_tokens(conn: Any, secret: bytes, org_id: str) -> dict:
    """A platform admin token (the operator's) and an org-scoped admin token of `demo` (the dashboard's), new on
    every run like the demo key; the previous run's are revoked."""
    for old in await admin_tokens.list_tokens(conn):
        if old.name in (DEMO_PLATFORM_TOKEN, DEMO_ORG_TOKEN) and old.status == "active":
            await admin_tokens.revoke_token(conn, old.token_id, actor=ACTOR)
    _, platform = await admin_tokens.create_token(conn, secret, "admin", None, DEMO_PLATFORM_TOKEN, actor=ACTOR)
    _, org_admin = await admin_tokens.create_token(conn, secret, "admin", org_id, DEMO_ORG_TOKEN, actor=ACTOR)
    return {"admin_token": platform, "org_admin_token": org_admin}


async def _maybe(lookup: Awaitable[T]) -> T | None:
    try:
        return await lookup
    except t.NotFound:
        return None
