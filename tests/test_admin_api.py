"""The admin API over a real Postgres: roles and scopes enforced, every mutation audited, errors OpenAI-shaped."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from crosslogic.api.admin.routes import ROUTES
from crosslogic.store import admin_tokens
from crosslogic.store import tenancy as t
from tests.admin_helpers import SECRET, admin_client, bearer, openai_error, seed

P = "/admin/v1"


@pytest.fixture
async def world(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        w = await seed(conn)
    finally:
        await conn.close()
    async with admin_client(database_url) as client:
        yield client, w, database_url


def _fill(path: str, w, org: str = "a", token_id: str | None = None) -> str:
    """A route's path with real values of org `org` for its parameters."""
    values = {"org": w.orgs[org].org_id, "env": w.envs[org].env_id, "key_id": w.keys[org].key_id,
              "model_id": "llama-3-8b", "region_id": "ap-south", "region": "ap-south", "node": "node-1",
              "token_id": token_id or str(uuid.uuid4())}
    return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], path)


async def test_no_bad_revoked_or_expired_token_is_a_401(world):
    client, w, database_url = world
    for headers in ({}, bearer("clat_" + "0" * 40), bearer("clsk_live_" + "0" * 32), {"authorization": "Basic x"}):
        response = await client.get(f"{P}/orgs", headers=headers)
        assert response.status == 401
        assert (await openai_error(response))["code"] == "invalid_admin_token"
    conn = await asyncpg.connect(database_url)
    try:
        record, token = await admin_tokens.create_token(conn, SECRET, "admin", None, "short",
                                                        expires_at=datetime.now(UTC) + timedelta(seconds=60))
        assert (await client.get(f"{P}/orgs", headers=bearer(token))).status == 200
        await conn.execute("UPDATE admin_tokens SET expires_at = now() - interval '1 s' WHERE token_id = $1",
                           uuid.UUID(record.token_id))
        assert (await client.get(f"{P}/orgs", headers=bearer(token))).status == 401
        await admin_tokens.revoke_token(conn, w.tokens["platform:admin"][:11])  # by display prefix
    finally:
        await conn.close()
    assert (await client.get(f"{P}/orgs", headers=bearer(w.tokens["platform:admin"]))).status == 401


@pytest.mark.parametrize("scope", ["platform", "a"])
async def test_a_read_only_token_cannot_call_any_mutating_route(world, scope):
    client, w, _ = world
    mutating = [r for r in ROUTES if r.mutates]
    assert len(mutating) > 20
    for route in mutating:
        response = await client.request(route.method, _fill(route.path, w), json={},
                                         headers=bearer(w.tokens[f"{scope}:read-only"]))
        assert response.status == 403, (route.method, route.path, response.status)
        assert (await openai_error(response))["type"] == "permission_error"


async def test_a_developer_manages_keys_but_nothing_else(world):
    client, w, _ = world
    dev = bearer(w.tokens["a:developer"])
    org = w.orgs["a"].org_id
    created = await client.post(f"{P}/orgs/{org}/keys", json={"env": "prod", "name": "ci"}, headers=dev)
    assert created.status == 201, await created.text()
    body = await created.json()
    assert body["api_key"].startswith("clsk_live_") and body["org_id"] == org
    revoked = await client.post(f"{P}/orgs/{org}/keys/{body['key_id']}/revoke", headers=dev)
    assert revoked.status == 200 and (await revoked.json())["status"] == "revoked"
    for method, path, payload in (("POST", f"{P}/orgs/{org}/environments", {"name": "staging"}),
                                  ("PUT", f"{P}/orgs/{org}/environments/prod/limits", {"tokens_per_min": 5}),
                                  ("POST", f"{P}/tokens", {"role": "admin"})):
        response = await client.request(method, path, json=payload, headers=dev)
        assert response.status == 403 and (await openai_error(response))["code"] == "insufficient_role"


async def test_org_a_admin_never_sees_org_b(world):
    client, w, _ = world
    a_admin = bearer(w.tokens["a:admin"])
    listed = await (await client.get(f"{P}/orgs", headers=a_admin)).json()
    assert [o["name"] for o in listed["data"]] == ["org-a"]
    b = w.orgs["b"]
    for path in (f"{P}/orgs/{b.org_id}", f"{P}/orgs/org-b", f"{P}/orgs/{b.org_id}/keys",
                 f"{P}/orgs/{b.org_id}/usage", f"{P}/orgs/{b.org_id}/billing", f"{P}/orgs/{b.org_id}/limits",
                 f"{P}/orgs/{w.orgs['a'].org_id}/keys/{w.keys['b'].key_id}",
                 f"{P}/orgs/{w.orgs['a'].org_id}/limits?key_id={w.keys['b'].key_id}"):
        response = await client.get(path, headers=a_admin)
        assert response.status == 404, path
        assert "org-b" not in (await openai_error(response))["message"]
    # ... nor changes it, even naming its key under org A's path
    revoke = await client.post(f"{P}/orgs/{w.orgs['a'].org_id}/keys/{w.keys['b'].key_id}/revoke", headers=a_admin)
    assert revoke.status == 404
    made = await client.post(f"{P}/tokens", json={"role": "admin", "org_id": b.org_id}, headers=a_admin)
    assert made.status == 404
    b_tokens = await (await client.get(f"{P}/tokens", headers=bearer(w.tokens["b:admin"]))).json()
    for other in (b_tokens["data"][0]["token_id"], str(uuid.uuid4())):  # org B's token, and none at all
        revoked = await client.post(f"{P}/tokens/{other}/revoke", headers=a_admin)
        assert revoked.status == 404 and (await openai_error(revoked))["message"] == "Admin token not found."
    a_tokens = await (await client.get(f"{P}/tokens", headers=a_admin)).json()
    assert {x["org_id"] for x in a_tokens["data"]} == {w.orgs["a"].org_id}
    # an unknown org answers exactly the same
    unknown = await client.get(f"{P}/orgs/{uuid.uuid4()}", headers=a_admin)
    assert unknown.status == 404 and (await openai_error(unknown))["message"] == "Organization not found."


async def test_an_org_token_cannot_reach_platform_routes(world):
    client, w, _ = world
    a_admin = bearer(w.tokens["a:admin"])
    for method, path in (("GET", f"{P}/nodes"), ("GET", f"{P}/routing-policy"), ("GET", f"{P}/audit"),
                         ("GET", f"{P}/usage"), ("POST", f"{P}/orgs"), ("POST", f"{P}/nodes/node-1/drain"),
                         ("PUT", f"{P}/orgs/{w.orgs['a'].org_id}/limits"),
                         ("PUT", f"{P}/orgs/{w.orgs['a'].org_id}/billing")):
        response = await client.request(method, path, json={"name": "x"}, headers=a_admin)
        assert response.status == 403, (method, path)
        assert (await openai_error(response))["code"] == "platform_scope_required"
    models = await client.get(f"{P}/models", headers=bearer(w.tokens["a:read-only"]))
    assert models.status == 200 and [m["model_id"] for m in (await models.json())["data"]] == ["llama-3-8b"]


def _sample_calls(w) -> dict[tuple[str, str], dict | None]:
    """One valid call of every mutating route (body), as a platform admin."""
    return {
        ("POST", f"{P}/orgs"): {"name": "org-c", "regions": ["ap-south"]},
        ("POST", f"{P}/orgs/{{org}}/suspend"): None, ("POST", f"{P}/orgs/{{org}}/resume"): None,
        ("POST", f"{P}/orgs/{{org}}/environments"): {"name": "staging", "quota_tokens_per_day": 1000},
        ("POST", f"{P}/orgs/{{org}}/environments/{{env}}/suspend"): None,
        ("POST", f"{P}/orgs/{{org}}/environments/{{env}}/resume"): None,
        ("POST", f"{P}/orgs/{{org}}/keys"): {"env": "prod", "name": "new"},
        ("POST", f"{P}/orgs/{{org}}/keys/{{key_id}}/rotate"): {"overlap_seconds": 60},
        ("POST", f"{P}/orgs/{{org}}/keys/{{key_id}}/revoke"): None,
        ("PUT", f"{P}/orgs/{{org}}/limits"): {"tokens_per_min": 1000, "quota_tokens_per_day": None},
        ("PUT", f"{P}/orgs/{{org}}/environments/{{env}}/limits"): {"requests_per_min": 60},
        ("PUT", f"{P}/orgs/{{org}}/keys/{{key_id}}/limits"): {"concurrency": 4},
        ("PUT", f"{P}/test-key-limits"): {"requests_per_min": 5, "max_tokens_per_request": None},
        ("PUT", f"{P}/orgs/{{org}}/billing"): {"bill_cap_usd": "100", "free_tokens_per_month": 5000},
        ("PUT", f"{P}/models/{{model_id}}"): {"input_price_usd_per_1m": "0.06"},
        ("PUT", f"{P}/regions/{{region_id}}"): {"display_name": "Mumbai 2"},
        ("POST", f"{P}/prices"): {"model": "llama-3-8b", "input_usd_per_1m": "0.07", "output_usd_per_1m": "0.09",
                                  "effective_from": (datetime.now(UTC) + timedelta(days=1)).isoformat()},
        ("PUT", f"{P}/routing-policy/{{region}}"): {"pinning": "strict"},
        ("DELETE", f"{P}/routing-policy/{{region}}"): None,
        ("POST", f"{P}/nodes/{{node}}/cordon"): None, ("POST", f"{P}/nodes/{{node}}/uncordon"): None,
        ("POST", f"{P}/nodes/{{node}}/drain"): None,
        ("POST", f"{P}/tokens"): {"role": "read-only", "org_id": w.orgs["a"].org_id},
        ("POST", f"{P}/tokens/{{token_id}}/revoke"): None,
    }


async def test_every_mutating_route_works_and_writes_an_audit_row_naming_the_token(world):
    client, w, database_url = world
    admin = bearer(w.tokens["platform:admin"])
    samples = _sample_calls(w)
    routes = [r for r in ROUTES if r.mutates]
    assert {(r.method, r.path) for r in routes} == set(samples), "every mutating route needs a sample call"
    conn = await asyncpg.connect(database_url)
    try:
        victim, _ = await admin_tokens.create_token(conn, SECRET, "read-only", None, "victim")
        me = await (await client.get(f"{P}/me", headers=admin)).json()
        actor = f"admin-token:{me['token']['token_prefix']}:{me['token']['token_id']}"
        for route in routes:
            path = _fill(route.path, w, token_id=victim.token_id)
            before = await conn.fetchval("SELECT count(*) FROM audit_log WHERE actor = $1", actor)
            body = samples[(route.method, route.path)]
            response = await client.request(route.method, path, json=body, headers=admin)
            assert response.status == route.status, (route.path, await response.text())
            after = await conn.fetchval("SELECT count(*) FROM audit_log WHERE actor = $1", actor)
            assert after > before, f"{route.method} {route.path} wrote no audit row"
    finally:
        await conn.close()


async def test_rotation_keeps_the_old_key_for_the_overlap_and_revocation_ends_it(world):
    client, w, database_url = world
    admin = bearer(w.tokens["a:admin"])
    org, key = w.orgs["a"].org_id, w.keys["a"]
    rotated = await client.post(f"{P}/orgs/{org}/keys/{key.key_id}/rotate", json={"overlap_seconds": 300},
                                headers=admin)
    assert rotated.status == 201
    body = await rotated.json()
    old = body["replaces"]
    assert old["key_id"] == key.key_id and old["status"] == "active"
    left = datetime.fromisoformat(old["expires_at"]) - datetime.now(UTC)
    assert timedelta(seconds=290) < left <= timedelta(seconds=300)
    assert body["api_key"].startswith("clsk_live_") and body["expires_at"] is None
    immediate = await client.post(f"{P}/orgs/{org}/keys/{body['key_id']}/rotate", headers=admin)
    assert (await immediate.json())["replaces"]["status"] == "revoked"  # no overlap: a leaked key, gone now
    too_long = await client.post(f"{P}/orgs/{org}/keys/{key.key_id}/rotate", json={"overlap_seconds": 10**9},
                                 headers=admin)
    assert too_long.status == 400 and (await openai_error(too_long))["param"] == "overlap_seconds"


async def _ledger_row(conn, org: t.Org, env: t.Environment, key: t.ApiKeyRecord, at: datetime, model: str,
                      tokens: int, cost: int) -> None:
    await conn.execute(
        "INSERT INTO usage_records (request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint, "
        "status_code, prompt_tokens, completion_tokens, total_tokens, usage_source, cost_microdollars, node_id) "
        "VALUES ($1, $2, $3, $4, $5, 'ap-south', $6, 'chat.completions', 200, $7, 0, $7, 'reported', $8, "
        "'node-secret')",
        uuid.uuid4().hex, at, uuid.UUID(org.org_id), uuid.UUID(env.env_id), uuid.UUID(key.key_id), model, tokens,
        cost)


async def test_usage_in_hour_and_day_buckets_with_breakdowns_only_of_the_callers_org(world):
    client, w, database_url = world
    now = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)  # inside the default window
    conn = await asyncpg.connect(database_url)
    try:
        for hours_ago, model, tokens in ((0, "llama-3-8b", 100), (0, "bge-small", 7), (2, "llama-3-8b", 50)):
            await _ledger_row(conn, w.orgs["a"], w.envs["a"], w.keys["a"], now - timedelta(hours=hours_ago), model,
                              tokens, tokens * 10)
        await _ledger_row(conn, w.orgs["b"], w.envs["b"], w.keys["b"], now, "llama-3-8b", 999, 1)
    finally:
        await conn.close()
    a_ro = bearer(w.tokens["a:read-only"])
    org = w.orgs["a"].org_id
    hourly = await (await client.get(f"{P}/orgs/{org}/usage", params={"bucket": "hour"}, headers=a_ro)).json()
    by_bucket = {r["bucket"]: r["total_tokens"] for r in hourly["data"]}
    this_hour = now.replace(minute=0).isoformat()  # the rows "0 hours ago" are in now's hour bucket
    assert by_bucket[this_hour] == 107 and sum(by_bucket.values()) == 157
    models = await (await client.get(f"{P}/orgs/{org}/usage", params={"bucket": "day", "group_by": "model"},
                                     headers=a_ro)).json()
    per_model: dict[str, int] = {}
    for r in models["data"]:
        per_model[r["group"]] = per_model.get(r["group"], 0) + r["total_tokens"]
    assert per_model == {"llama-3-8b": 150, "bge-small": 7}
    assert "node-secret" not in str(models)
    bad = await client.get(f"{P}/orgs/{org}/usage", params={"group_by": "node"}, headers=a_ro)
    assert bad.status == 400 and (await openai_error(bad))["param"] == "group_by"
    everyone = await (await client.get(f"{P}/usage", params={"group_by": "org"},
                                       headers=bearer(w.tokens["platform:read-only"]))).json()
    assert sum(r["total_tokens"] for r in everyone["data"]) == 157 + 999


async def test_billing_status_shows_the_free_tier_left(world):
    client, w, database_url = world
    conn = await asyncpg.connect(database_url)
    try:
        month = datetime.now(UTC).date().replace(day=1)
        await conn.execute("INSERT INTO org_monthly_spend (org_id, month, cost_microdollars, tokens, free_tokens, "
                           "owed_microdollars) VALUES ($1, $2, 5000, 30000, 25000, 400)",
                           uuid.UUID(w.orgs["a"].org_id), month)
    finally:
        await conn.close()
    status = await (await client.get(f"{P}/orgs/{w.orgs['a'].org_id}/billing",
                                     headers=bearer(w.tokens["a:read-only"]))).json()
    assert status["free_tier"] == {"allowance_tokens": 25000, "unlimited": False, "used_tokens": 25000,
                                   "remaining_tokens": 0}
    assert status["tokens"] == 30000 and status["owed_microdollars"] == 400


async def test_nodes_cordon_uncordon_and_drain(world):
    client, w, _ = world
    admin = bearer(w.tokens["platform:admin"])
    cordoned = await (await client.post(f"{P}/nodes/node-1/cordon", headers=admin)).json()
    assert (cordoned["status"], cordoned["status_reason"]) == ("draining", "cordoned")
    back = await (await client.post(f"{P}/nodes/node-1/uncordon", headers=admin)).json()
    assert (back["status"], back["status_reason"]) == ("active", "")
    again = await client.post(f"{P}/nodes/node-1/uncordon", headers=admin)
    assert again.status == 409 and (await openai_error(again))["code"] == "conflict"
    nodes = await (await client.get(f"{P}/nodes", headers=bearer(w.tokens["platform:read-only"]))).json()
    assert nodes["data"][0]["endpoint_host"] == "10.0.0.7"  # platform only: nodes are internal


async def test_limits_set_clear_and_in_force(world):
    client, w, _ = world
    org = w.orgs["a"].org_id
    admin = bearer(w.tokens["a:admin"])
    put = await client.put(f"{P}/orgs/{org}/environments/prod/limits", json={"tokens_per_min": 1234}, headers=admin)
    assert put.status == 200, await put.text()
    shown = await (await client.get(f"{P}/orgs/{org}/limits", params={"env": "prod"}, headers=admin)).json()
    env_layer = next(layer for layer in shown["layers"] if layer["layer"] == "env")
    assert {"kind": "tokens_per_min", "value": 1234} in [{k: v for k, v in lim.items() if k in ("kind", "value")}
                                                        for lim in env_layer["limits"]]
    wrong = await client.put(f"{P}/orgs/{org}/environments/prod/limits", json={"tokens_per_day": 5}, headers=admin)
    assert wrong.status == 400 and (await openai_error(wrong))["code"] == "unknown_parameter"
    cleared = await client.put(f"{P}/orgs/{org}/environments/prod/limits", json={"tokens_per_min": None},
                               headers=admin)
    assert (await cleared.json())["cleared"] == ["tokens_per_min"]


async def test_a_test_key_is_created_listed_and_shown_with_its_mode_and_the_test_key_caps(world):
    client, w, _ = world
    org = w.orgs["a"].org_id
    developer = bearer(w.tokens["a:developer"])
    made = await client.post(f"{P}/orgs/{org}/keys", json={"env": "prod", "name": "ci", "mode": "test"},
                             headers=developer)
    assert made.status == 201, await made.text()
    key = await made.json()
    assert key["mode"] == "test" and re.fullmatch(r"clsk_test_[0-9a-f]{32}", key["api_key"])
    assert key["key_prefix"] == key["api_key"][:16]
    listed = await (await client.get(f"{P}/orgs/{org}/keys", headers=developer)).json()
    assert {k["key_id"]: k["mode"] for k in listed["data"]} == {w.keys["a"].key_id: "live", key["key_id"]: "test"}
    # A rotation keeps the mode (and the test prefix).
    rotated = await (await client.post(f"{P}/orgs/{org}/keys/{key['key_id']}/rotate", headers=developer)).json()
    assert rotated["mode"] == "test" and rotated["api_key"].startswith("clsk_test_")
    bad = await client.post(f"{P}/orgs/{org}/keys", json={"env": "prod", "mode": "free"}, headers=developer)
    assert bad.status == 400 and (await openai_error(bad))["param"] == "mode"

    # The caps: readable by every token, changed by the platform only; a key's own higher limit does not lift them.
    caps = await (await client.get(f"{P}/test-key-limits", headers=developer)).json()
    assert caps == {"tokens_per_min": 5000, "requests_per_min": 10, "concurrency": 2, "max_tokens_per_request": 256}
    admin = bearer(w.tokens["a:admin"])
    refused = await client.put(f"{P}/test-key-limits", json={"requests_per_min": 1000}, headers=admin)
    assert refused.status == 403  # an org's admin cannot lift them
    raised = await client.put(f"{P}/orgs/{org}/keys/{rotated['key_id']}/limits", json={"requests_per_min": 500},
                              headers=admin)
    assert raised.status == 200, await raised.text()
    shown = await (await client.get(f"{P}/orgs/{org}/limits", params={"key_id": rotated["key_id"]},
                                    headers=developer)).json()
    assert shown["key_mode"] == "test"
    key_layer = {lim["kind"]: lim for lim in next(x for x in shown["layers"] if x["layer"] == "key")["limits"]}
    assert key_layer["requests_per_min"] == {"kind": "requests_per_min", "value": 10, "source": "test-key cap"}
    assert key_layer["tokens_per_min"]["value"] == 5000 and key_layer["tokens_per_min"]["source"] == "test-key cap"
    quotas = {q["kind"]: q for q in shown["quotas"]}
    assert quotas["max_tokens_per_request"]["value"] == 256
    assert quotas["max_tokens_per_request"]["source"] == "test-key cap"
    lowered = await client.put(f"{P}/orgs/{org}/keys/{rotated['key_id']}/limits", json={"requests_per_min": 3},
                               headers=admin)
    assert lowered.status == 200
    shown = await (await client.get(f"{P}/orgs/{org}/limits", params={"key_id": rotated["key_id"]},
                                    headers=developer)).json()
    key_layer = {lim["kind"]: lim for lim in next(x for x in shown["layers"] if x["layer"] == "key")["limits"]}
    assert key_layer["requests_per_min"] == {"kind": "requests_per_min", "value": 3, "source": "key override"}
    live = await (await client.get(f"{P}/orgs/{org}/limits", params={"key_id": w.keys["a"].key_id},
                                   headers=developer)).json()
    assert live["key_mode"] == "live"
    assert {q["kind"]: q["value"] for q in live["quotas"]}["max_tokens_per_request"] is None


async def test_unknown_paths_methods_and_bodies_are_openai_errors(world):
    client, w, _ = world
    admin = bearer(w.tokens["platform:admin"])
    assert (await openai_error(await client.get(f"{P}/nope", headers=admin)))["code"] == "unknown_url"
    wrong = await client.delete(f"{P}/orgs", headers=admin)
    assert wrong.status == 405 and (await openai_error(wrong))["code"] == "method_not_allowed"
    for raw in (b"{", b"[1]", b"\xff"):
        response = await client.post(f"{P}/orgs", data=raw, headers={**admin, "content-type": "application/json"})
        assert response.status == 400
        await openai_error(response)
    dup = await client.post(f"{P}/orgs", json={"name": "org-a"}, headers=admin)
    assert dup.status == 409


async def test_the_openapi_document_describes_every_route(world):
    client, _, _ = world
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    described = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert described == {(r.method, r.path) for r in ROUTES}
