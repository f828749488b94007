"""The operator admin CLI against a real, freshly migrated Postgres database per test."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from crosslogic.commands.tenancy import register
from crosslogic.keys import hash_api_key
from crosslogic.store import admin_tokens, tenancy
from crosslogic.store.demo import seed_demo
from tests.cli_helpers import Run, runner

KEY_RE = re.compile(r"clsk_live_[0-9a-f]{32}")


def _parser(state_dir: Path) -> argparse.ArgumentParser:
    # Stand-in for crosslogic/commands/__init__.py: a global --state-dir, then the admin commands.
    parser = argparse.ArgumentParser(prog="crosslogic")
    parser.add_argument("--state-dir", default=str(state_dir))
    register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture
def cli(database_url, key_secret, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CROSSLOGIC_DATABASE_URL", database_url)
    monkeypatch.setenv("CROSSLOGIC_KEY_SECRET", key_secret)
    monkeypatch.setenv("USER", "test-operator")
    parser = _parser(tmp_path / "state")

    return runner(parser, capsys)


def sql(database_url: str, query: str, *params: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(query, *params)
        finally:
            await conn.close()

    return asyncio.run(go())


def ok(run: Run) -> Run:
    assert run.code == 0, run.err
    assert run.err == ""
    return run


@pytest.fixture
def acme(cli):
    """Region ap-south, org acme, env prod."""
    ok(cli("region", "add", "ap-south", "--name", "Mumbai"))
    ok(cli("org", "create", "acme", "--region", "ap-south"))
    ok(cli("env", "create", "prod", "--org", "acme", "--region", "ap-south"))
    return cli


def test_key_create_prints_the_key_once_and_the_database_holds_only_its_hmac(acme, database_url, key_secret):
    run = ok(acme("key", "create", "--org", "acme", "--env", "prod", "--name", "ci"))
    keys = KEY_RE.findall(run.out)
    assert len(keys) == 1 and re.fullmatch(r"^clsk_live_[0-9a-f]{32}$", keys[0])
    assert "cannot be shown again" in run.out
    plaintext = keys[0]

    (row,) = sql(database_url, "SELECT key_hash, key_prefix, status FROM api_keys")
    assert row["key_hash"] == hash_api_key(key_secret.encode(), plaintext)
    assert plaintext.startswith(row["key_prefix"]) and row["status"] == "active"
    secret_part = plaintext[len(row["key_prefix"]) :]
    for table in ("api_keys", "audit_log"):
        leaks = sql(
            database_url,
            f"SELECT count(*) AS n FROM {table} t WHERE t::text LIKE '%' || $1 || '%'",
            secret_part,
        )
        assert leaks[0]["n"] == 0, f"key material found in {table}"

    listed = ok(acme("key", "list", "--org", "acme", "--json")).json()
    assert len(listed) == 1 and listed[0]["name"] == "ci"
    assert "key_hash" not in listed[0] and plaintext not in json.dumps(listed)


def test_key_create_json_returns_the_plaintext_and_the_record(acme):
    created = ok(acme("key", "create", "--org", "acme", "--env", "prod", "--role", "read-only", "--json")).json()
    assert KEY_RE.fullmatch(created["api_key"])
    assert created["role"] == "read-only" and created["org_name"] == "acme" and created["env_name"] == "prod"
    assert "key_hash" not in created


def test_key_revoke_sets_status_and_revoked_at(acme, database_url):
    created = ok(acme("key", "create", "--org", "acme", "--env", "prod", "--json")).json()
    revoked = ok(acme("key", "revoke", created["key_prefix"], "--json")).json()
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    (row,) = sql(database_url, "SELECT status, revoked_at FROM api_keys")
    assert row["status"] == "revoked" and row["revoked_at"] is not None

    again = acme("key", "revoke", created["key_id"])
    assert again.code == 1 and "already revoked" in again.err


def test_leaked_key_can_be_revoked_by_its_plaintext(acme, database_url):
    created = ok(acme("key", "create", "--org", "acme", "--env", "prod", "--json")).json()
    ok(acme("key", "revoke", created["api_key"]))
    assert sql(database_url, "SELECT status FROM api_keys")[0]["status"] == "revoked"


def test_key_rotate_revokes_the_old_key_and_issues_a_new_one_in_one_transaction(acme, database_url, key_secret):
    old = ok(
        acme("key", "create", "--org", "acme", "--env", "prod", "--name", "ci", "--role", "admin",
             "--rate-limit-tokens-per-min", "9000", "--json")
    ).json()  # fmt: skip
    run = ok(acme("key", "rotate", old["key_id"]))
    (new_plaintext,) = KEY_RE.findall(run.out)
    assert new_plaintext != old["api_key"]

    rows = {r["key_hash"]: r for r in sql(database_url, "SELECT * FROM api_keys")}
    secret = key_secret.encode()
    old_row, new_row = rows[hash_api_key(secret, old["api_key"])], rows[hash_api_key(secret, new_plaintext)]
    assert old_row["status"] == "revoked" and new_row["status"] == "active"
    for attr in ("org_id", "env_id", "name", "role", "rate_limit_tokens_per_min", "region"):
        assert new_row[attr] == old_row[attr]
    # now() is fixed per transaction: equal timestamps prove revoke and create committed together.
    assert old_row["revoked_at"] == new_row["created_at"]

    failed = acme("key", "rotate", old["key_id"])
    assert failed.code == 1 and "revoked" in failed.err
    assert len(sql(database_url, "SELECT 1 FROM api_keys")) == 2  # the failed rotation left nothing behind


def test_org_suspend_and_resume(acme, database_url):
    assert ok(acme("org", "suspend", "acme", "--json")).json()["status"] == "suspended"
    assert sql(database_url, "SELECT status FROM orgs")[0]["status"] == "suspended"
    org_id = ok(acme("org", "list", "--json")).json()[0]["org_id"]
    assert ok(acme("org", "resume", org_id, "--json")).json()["status"] == "active"  # by UUID too


def test_env_suspend_and_resume_by_org_and_name(acme, database_url):
    assert ok(acme("env", "suspend", "prod", "--org", "acme", "--json")).json()["status"] == "suspended"
    assert sql(database_url, "SELECT status FROM environments")[0]["status"] == "suspended"
    env_id = ok(acme("env", "list", "--org", "acme", "--json")).json()[0]["env_id"]
    assert ok(acme("env", "resume", env_id, "--json")).json()["status"] == "active"

    nameless = acme("env", "suspend", "prod")
    assert nameless.code == 2 and "--org" in nameless.err


@pytest.mark.parametrize(("suspend", "words"), [
    (("org", "suspend", "acme"), "org 'acme' is suspended"),
    (("env", "suspend", "prod", "--org", "acme"), "environment 'prod' of org 'acme' is suspended"),
])
def test_key_create_refuses_a_suspended_org_or_env_unless_told_and_then_says_so(acme, database_url, suspend, words):
    ok(acme(*suspend))
    refused = acme("key", "create", "--org", "acme", "--env", "prod")
    assert refused.code == 1 and words in refused.err and "--allow-suspended" in refused.err
    assert "Traceback" not in refused.err and KEY_RE.search(refused.out + refused.err) is None
    assert sql(database_url, "SELECT count(*) AS n FROM api_keys")[0]["n"] == 0
    assert sql(database_url, "SELECT count(*) AS n FROM audit_log WHERE action = 'key.create'")[0]["n"] == 0

    made = acme("key", "create", "--org", "acme", "--env", "prod", "--allow-suspended")
    assert made.code == 0 and len(KEY_RE.findall(made.out)) == 1
    assert words in made.err and "403 tenant_suspended" in made.err and "until it is resumed" in made.err
    rotated = acme("key", "rotate", KEY_RE.findall(made.out)[0])  # a leaked key is replaceable even now
    assert rotated.code == 0 and words in rotated.err


def test_key_create_in_an_active_tenant_prints_no_warning(acme):
    assert ok(acme("key", "create", "--org", "acme", "--env", "prod")).err == ""


def test_model_max_n_defaults_to_128_and_is_set_by_add_and_update(cli, database_url):
    assert ok(cli("model", "add", "m", "--json")).json()["max_n"] == 128
    assert ok(cli("model", "update", "m", "--max-n", "16", "--json")).json()["max_n"] == 16
    ok(cli("model", "add", "m", "--context-length", "4096"))  # other flags keep it
    assert sql(database_url, "SELECT max_n, context_length FROM models")[0]["max_n"] == 16
    assert "MAX_N" in ok(cli("model", "list")).out
    bad = cli("model", "update", "m", "--max-n", "0")
    assert bad.code == 2 and "max n" in bad.err
    unknown = cli("model", "update", "nope", "--max-n", "4")
    assert unknown.code == 1 and "not found" in unknown.err
    assert [r["model_id"] for r in sql(database_url, "SELECT model_id FROM models")] == ["m"]


def test_model_add_converts_dollars_per_million_to_exact_microdollars(cli, database_url):
    ok(cli("model", "add", "llama-3-8b", "--input-price", "0.05", "--output-price", "0.08"))
    (row,) = sql(database_url, "SELECT * FROM models")
    assert row["input_price_microdollars_per_1m"] == 50000
    assert row["output_price_microdollars_per_1m"] == 80000

    too_precise = cli("model", "add", "llama-3-8b", "--input-price", "0.0000001")
    assert too_precise.code == 2 and "precision" in too_precise.err and "Traceback" not in too_precise.err
    assert sql(database_url, "SELECT input_price_microdollars_per_1m AS p FROM models")[0]["p"] == 50000

    # An upsert: flags left out keep their value.
    ok(cli("model", "add", "llama-3-8b", "--context-length", "16384"))
    (row,) = sql(database_url, "SELECT * FROM models")
    assert row["context_length"] == 16384 and row["input_price_microdollars_per_1m"] == 50000


def test_model_add_rejects_a_default_above_the_maximum(cli, database_url):
    bad = cli("model", "add", "m", "--max-output-tokens", "100", "--default-max-tokens", "200")
    assert bad.code == 2 and "exceeds" in bad.err
    assert sql(database_url, "SELECT 1 FROM models") == []


def test_region_add_stores_the_fallback_chain_and_multiplier_in_ppm(cli, database_url):
    ok(cli("region", "add", "ap-south", "--name", "Mumbai", "--fallback", "ap-southeast,eu-central",
           "--fallback", "us-east", "--price-multiplier", "1.2"))  # fmt: skip
    (row,) = sql(database_url, "SELECT * FROM regions")
    assert row["fallback_chain"] == ["ap-southeast", "eu-central", "us-east"]
    assert row["price_multiplier_ppm"] == 1_200_000 and row["display_name"] == "Mumbai"
    listed = ok(cli("region", "list")).out
    assert "ap-southeast > eu-central > us-east" in listed and "1.2" in listed


def test_node_add_list_drain_and_remove(acme, database_url):
    ok(acme("model", "add", "llama-3-8b"))
    node = ok(
        acme("node", "add", "gpu-1", "--region", "ap-south", "--host", "10.0.0.5", "--port", "8000",
             "--models", "llama-3-8b", "--spot", "--gpu-type", "L4", "--reserved-org", "acme", "--json")
    ).json()  # fmt: skip
    assert node["model_list"] == ["llama-3-8b"] and node["spot"] is True and node["reserved_org_id"]
    ok(acme("node", "add", "gpu-1", "--region", "ap-south", "--host", "10.0.0.6", "--port", "8001"))
    (row,) = sql(database_url, "SELECT * FROM nodes")
    assert (row["endpoint_host"], row["endpoint_port"], row["gpu_type"]) == ("10.0.0.6", 8001, "L4")

    assert ok(acme("node", "drain", "gpu-1", "--json")).json()["status"] == "draining"
    assert "10.0.0.6:8001" in ok(acme("node", "list")).out
    ok(acme("node", "remove", "gpu-1"))
    assert ok(acme("node", "list", "--json")).json() == []

    unknown_model = acme("node", "add", "gpu-2", "--region", "ap-south", "--host", "h", "--port", "1",
                         "--models", "nope")  # fmt: skip
    assert unknown_model.code == 1 and "nope" in unknown_model.err


def test_every_list_command_has_parseable_json(acme):
    ok(acme("model", "add", "bge-small", "--kind", "embedding", "--input-price", "0.01"))
    ok(acme("key", "create", "--org", "acme", "--env", "prod"))
    for group in ("org", "env", "key", "model", "region", "node"):
        payload = ok(acme(group, "list", "--json")).json()
        assert isinstance(payload, list)
    (model,) = ok(acme("model", "list", "--json")).json()
    assert model["input_price_microdollars_per_1m"] == 10000 and model["kind"] == "embedding"


def test_mutations_are_audited_with_the_actor(acme, database_url):
    ok(acme("org", "suspend", "acme", "--actor", "alice"))
    rows = sql(database_url, "SELECT actor, action, target_type FROM audit_log ORDER BY audit_id")
    assert [r["action"] for r in rows] == ["region.upsert", "org.create", "env.create", "org.set_status"]
    assert rows[0]["actor"] == "test-operator" and rows[-1]["actor"] == "alice"


def test_unknown_org_is_a_clean_error_with_exit_code_1(cli, database_url):
    run = cli("env", "create", "prod", "--org", "no-such-org")
    assert run.code == 1 and run.out == ""
    assert "no-such-org" in run.err and "not found" in run.err and "Traceback" not in run.err
    assert sql(database_url, "SELECT 1 FROM environments") == []


def test_duplicate_org_name_is_a_conflict(acme):
    run = acme("org", "create", "acme")
    assert run.code == 1 and "already exists" in run.err


def test_missing_database_configuration_exits_2(cli, monkeypatch):
    monkeypatch.delenv("CROSSLOGIC_DATABASE_URL")
    run = cli("org", "list")
    assert run.code == 2 and "CROSSLOGIC_DATABASE_URL" in run.err


async def _key_is_usable(conn: asyncpg.Connection, secret: bytes, api_key: str) -> bool:
    row = await conn.fetchrow(
        """SELECT k.status AS k, e.status AS e, o.status AS o FROM api_keys k
           JOIN environments e USING (env_id) JOIN orgs o ON o.org_id = k.org_id WHERE k.key_hash = $1""",
        hash_api_key(secret, api_key),
    )
    return row is not None and (row["k"], row["e"], row["o"]) == ("active", "active", "active")


async def test_seed_demo_is_idempotent_and_always_returns_a_working_key(database_url, key_secret):
    secret = key_secret.encode()
    nodes = [("sim-1", "127.0.0.1", 9001), ("sim-2", "127.0.0.1", 9002)]
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        first = await seed_demo(pool, secret, nodes)
        async with pool.acquire() as conn:
            second = await seed_demo(conn, secret, [("sim-1", "127.0.0.2", 9101)])
            assert set(first) == {"api_key", "org_id", "env_id", "key_id", "admin_token", "org_admin_token"}
            for name in ("admin_token", "org_admin_token"):  # each run's tokens work, the previous run's no more
                assert await admin_tokens.authenticate(conn, secret, second[name]) is not None
                assert await admin_tokens.authenticate(conn, secret, first[name]) is None
            assert (first["org_id"], first["env_id"]) == (second["org_id"], second["env_id"])
            assert KEY_RE.fullmatch(second["api_key"]) and second["api_key"] != first["api_key"]
            assert await _key_is_usable(conn, secret, second["api_key"])
            assert not await _key_is_usable(conn, secret, first["api_key"])  # rotated away

            counts = await conn.fetchrow(
                """SELECT (SELECT count(*) FROM orgs) AS orgs, (SELECT count(*) FROM environments) AS envs,
                          (SELECT count(*) FROM api_keys WHERE status = 'active') AS active_keys,
                          (SELECT count(*) FROM regions) AS regions, (SELECT count(*) FROM models) AS models,
                          (SELECT count(*) FROM nodes) AS nodes"""
            )
            assert dict(counts) == {
                "orgs": 1,
                "envs": 1,
                "active_keys": 1,
                "regions": 4,
                "models": 2,
                "nodes": 2,
            }
            mumbai = await conn.fetchrow("SELECT * FROM regions WHERE region_id = 'ap-south'")
            assert mumbai["display_name"] == "Mumbai"
            assert mumbai["fallback_chain"] == ["ap-southeast", "eu-central", "us-east"]
            llama = await conn.fetchrow("SELECT * FROM models WHERE model_id = 'llama-3-8b'")
            assert (llama["input_price_microdollars_per_1m"], llama["output_price_microdollars_per_1m"]) == (
                50000,
                80000,
            )
            sim1 = await conn.fetchrow("SELECT * FROM nodes WHERE name = 'sim-1'")
            assert (sim1["endpoint_host"], sim1["endpoint_port"], sim1["region"]) == (
                "127.0.0.2",
                9101,
                "ap-south",
            )
            assert sorted(sim1["model_list"]) == ["bge-small", "llama-3-8b"]
    finally:
        await pool.close()


async def test_seed_demo_reactivates_a_suspended_demo_org(database_url, key_secret):
    secret = key_secret.encode()
    conn = await asyncpg.connect(database_url)
    try:
        await seed_demo(conn, secret, [])
        await conn.execute("UPDATE orgs SET status = 'suspended' WHERE name = 'demo'")
        again = await seed_demo(conn, secret, [])
        assert await _key_is_usable(conn, secret, again["api_key"])
    finally:
        await conn.close()


async def test_tenancy_changes_notify_listeners_with_table_and_id(database_url):
    # Every write to orgs/environments/api_keys tells authz replicas which row changed.
    received: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    await listener.add_listener("crosslogic_tenancy", lambda *args: received.put_nowait(args[-1]))
    try:
        org = await tenancy.create_org(listener, "acme")
        assert await asyncio.wait_for(received.get(), 5) == f"orgs:{org.org_id}"
        env = await tenancy.create_env(listener, "acme", "prod")
        assert await asyncio.wait_for(received.get(), 5) == f"environments:{env.env_id}"
    finally:
        await listener.close()


async def test_data_functions_accept_a_pool(database_url, key_secret):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await tenancy.add_region(pool, "eu-central", "Frankfurt")
        org = await tenancy.create_org(pool, "acme", "enterprise", ["eu-central"], 500)
        assert (org.billing_plan, org.region_preferences, org.reserved_tps) == ("enterprise", ("eu-central",), 500)
        await tenancy.create_env(pool, "acme", "prod", "eu-central", quota_tokens_per_day=10**6)
        record, plaintext = await tenancy.create_key(pool, key_secret.encode(), "acme", "prod", "ci")
        rotated, _ = await tenancy.rotate_key(pool, key_secret.encode(), plaintext)
        statuses = {k.key_id: k.status for k in await tenancy.list_keys(pool, "acme", "prod")}
        assert statuses == {record.key_id: "revoked", rotated.key_id: "active"}
        with pytest.raises(tenancy.Conflict):
            await tenancy.create_env(pool, org.org_id, "prod")
    finally:
        await pool.close()


def test_key_rotate_with_an_overlap_keeps_the_old_key_until_then(acme, database_url):
    old = ok(acme("key", "create", "--org", "acme", "--env", "prod", "--json")).json()
    run = ok(acme("key", "rotate", old["key_id"], "--overlap", "600"))
    assert "works for 600 s more" in run.out
    (row,) = sql(database_url, "SELECT status, expires_at - now() AS left FROM api_keys WHERE key_id = $1",
                 uuid.UUID(old["key_id"]))
    assert row["status"] == "active" and 590 < row["left"].total_seconds() <= 600
    assert acme("key", "rotate", old["key_id"], "--overlap", "-1").code == 2


def test_token_create_list_revoke_and_the_token_authenticates_until_revoked(acme, database_url, key_secret):
    made = ok(acme("token", "create", "--role", "read-only", "--org", "acme", "--name", "viewer", "--json")).json()
    assert re.fullmatch(r"clat_[0-9a-f]{40}", made["token"]) and made["org_name"] == "acme"
    listed = ok(acme("token", "list", "--json")).json()
    assert [t["name"] for t in listed] == ["viewer"] and "token" not in listed[0]

    async def usable() -> bool:
        conn = await asyncpg.connect(database_url)
        try:
            return await admin_tokens.authenticate(conn, key_secret.encode(), made["token"]) is not None
        finally:
            await conn.close()

    assert asyncio.run(usable())
    ok(acme("token", "revoke", made["token_prefix"]))
    assert not asyncio.run(usable())
    (audit,) = sql(database_url, "SELECT actor FROM audit_log WHERE action = 'admin_token.revoke'")
    assert audit["actor"] == "test-operator"


def test_usage_show_and_month_are_the_admin_apis_queries(acme, database_url):
    key = ok(acme("key", "create", "--org", "acme", "--env", "prod", "--json")).json()
    sql(database_url, "INSERT INTO usage_records (request_id, occurred_at, org_id, env_id, key_id, region, model, "
        "endpoint, status_code, prompt_tokens, completion_tokens, total_tokens, usage_source, cost_microdollars) "
        "VALUES ('r1', now() - interval '1 minute', $1, $2, $3, 'ap-south', 'llama-3-8b', 'chat.completions', "
        "200, 30, 12, 42, 'reported', 7)", uuid.UUID(key["org_id"]), uuid.UUID(key["env_id"]),
        uuid.UUID(key["key_id"]))
    rows = ok(acme("usage", "show", "--org", "acme", "--group-by", "model", "--json")).json()
    assert [(r["group"], r["total_tokens"], r["cost_microdollars"]) for r in rows] == [("llama-3-8b", 42, 7)]
    month = ok(acme("usage", "month", "--org", "acme"))
    assert "org acme (serverless)" in month.out and "free tier:" in month.out


def test_key_create_test_makes_a_test_key_listed_with_its_mode(acme):
    run = ok(acme("key", "create", "--org", "acme", "--env", "prod", "--name", "ci", "--test"))
    (plaintext,) = re.findall(r"clsk_test_[0-9a-f]{32}", run.out)
    assert "never billed" in run.out and not KEY_RE.search(run.out)
    ok(acme("key", "create", "--org", "acme", "--env", "prod", "--name", "backend"))
    listed = ok(acme("key", "list", "--org", "acme", "--json")).json()
    assert {k["name"]: k["mode"] for k in listed} == {"ci": "test", "backend": "live"}
    assert "MODE" in ok(acme("key", "list", "--org", "acme")).out
    rotated = ok(acme("key", "rotate", plaintext, "--json")).json()
    assert rotated["mode"] == "test" and rotated["api_key"].startswith("clsk_test_")
