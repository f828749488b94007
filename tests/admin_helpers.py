"""A small tenancy for the admin API tests: two orgs (each with an env and a key), a node, and an admin token of
every role on every scope; plus the app over a real Postgres."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

from crosslogic.api.admin.app import build_admin_app
from crosslogic.store import admin_tokens
from crosslogic.store import tenancy as t

SECRET = b"admin-api-test-secret"


@dataclass
class World:
    orgs: dict[str, t.Org] = field(default_factory=dict)
    envs: dict[str, t.Environment] = field(default_factory=dict)
    keys: dict[str, t.ApiKeyRecord] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # "platform:admin", "a:read-only", ... -> plaintext


async def seed(conn: asyncpg.Connection) -> World:
    w = World()
    await t.add_region(conn, "ap-south", "Mumbai", [])
    await t.add_model(conn, "llama-3-8b", "chat", input_price_microdollars_per_1m=50_000,
                      output_price_microdollars_per_1m=80_000)
    for name in ("a", "b"):
        org = w.orgs[name] = await t.create_org(conn, f"org-{name}", "serverless", ["ap-south"])
        env = w.envs[name] = await t.create_env(conn, org.org_id, "prod")
        w.keys[name], _ = await t.create_key(conn, SECRET, org.org_id, env.env_id, f"key-{name}")
    await t.add_node(conn, "node-1", "ap-south", "10.0.0.7", 8000, ["llama-3-8b"])
    for scope, org_id in (("platform", None), ("a", w.orgs["a"].org_id), ("b", w.orgs["b"].org_id)):
        for role in admin_tokens.ADMIN_ROLES:
            _, w.tokens[f"{scope}:{role}"] = await admin_tokens.create_token(conn, SECRET, role, org_id,
                                                                            f"{scope}-{role}")
    return w


@asynccontextmanager
async def admin_client(database_url: str):
    async with asyncpg.create_pool(database_url, min_size=0, max_size=4) as pool:
        async with TestClient(TestServer(build_admin_app(pool, SECRET, "ap-south"))) as client:
            yield client


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def openai_error(response) -> dict:
    """The error object of an OpenAI-shaped error answer (asserting the shape)."""
    assert response.content_type == "application/json", response.content_type
    payload = await response.json()
    assert set(payload) == {"error"}, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    return payload["error"]
