"""`crosslogic limits` against a real, freshly migrated Postgres per test and a real Valkey: show (the limiter's own
reading plus where each value comes from), set / clear (validated, audited, notified), usage (live state)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

import asyncpg
import openai
import pytest
import redis.asyncio as aioredis

from crosslogic.commands import limits as limits_cli
from crosslogic.ratelimit import live
from crosslogic.ratelimit.engine import KINDS, Limiter, tenant_scope
from crosslogic.ratelimit.limits import LayerLimits, TenantLimits
from crosslogic.ratelimit.store import LimitStore, follow_limit_changes
from crosslogic.store import limit_overrides, tenancy
from crosslogic.store.db import open_pool
from tests.cli_helpers import Run, runner
from tests.gateway_helpers import client
from tests.ratelimit_helpers import ledger_for_key, limited_tenant, wait_for


@pytest.fixture
def cli(database_url, key_secret, valkey_url, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CROSSLOGIC_DATABASE_URL", database_url)
    monkeypatch.setenv("CROSSLOGIC_KEY_SECRET", key_secret)
    monkeypatch.setenv("CROSSLOGIC_REDIS_URL", valkey_url)
    monkeypatch.setenv("USER", "test-operator")
    parser = argparse.ArgumentParser(prog="crosslogic")
    parser.add_argument("--state-dir", default=str(tmp_path / "state"))
    limits_cli.register(parser.add_subparsers(dest="command", required=True))

    return runner(parser, capsys)


def ok(run: Run) -> Run:
    assert run.code == 0, run.err
    return run


def refused(run: Run, code: int, *words: str) -> Run:
    assert run.code == code, (run.out, run.err)
    assert "Traceback" not in run.err and all(w in run.err for w in words), run.err
    return run


async def _fetch(database_url: str, query: str, *params: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(query, *params)
    finally:
        await conn.close()


def sql(database_url: str, query: str, *params: Any) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(database_url, query, *params))


@pytest.fixture
def acme(database_url, key_secret) -> dict[str, str]:
    """Region ap-south, org acme on the free plan, env prod (concurrency 3), one key (1,000 tokens/min)."""

    async def make() -> dict[str, str]:
        conn = await asyncpg.connect(database_url)
        try:
            await tenancy.add_region(conn, "ap-south", "Mumbai")
            org = await tenancy.create_org(conn, "acme", "free", ["ap-south"])
            env = await tenancy.create_env(conn, "acme", "prod", concurrency_limit=3)
            key, _ = await tenancy.create_key(conn, key_secret.encode(), "acme", "prod", "ci",
                                              rate_limit_tokens_per_min=1_000)
            return {"org": org.org_id, "env": env.env_id, "key": key.key_id, "prefix": key.key_prefix}
        finally:
            await conn.close()

    return asyncio.run(make())


def limits_of(shown: dict) -> dict[tuple[str, str], dict]:
    return {(layer["layer"], limit["kind"]): limit for layer in shown["layers"] for limit in layer["limits"]}


def enforced(database_url: str, key_id: str):
    async def read():
        async with open_pool(database_url) as pool:
            store = LimitStore(pool)
            return await store.for_key(key_id), await store.platform()

    return asyncio.run(read())


# ---------------------------------------------------------------- show


def test_show_key_gives_the_limiters_own_numbers_and_where_each_comes_from(cli, acme, database_url):
    shown = ok(cli("limits", "show", "--key", acme["prefix"], "--json")).json()
    limits = limits_of(shown)
    assert limits[("org", "tokens_per_min")] == {"kind": "tokens_per_min", "value": 40_000,
                                                 "source": "plan default (free)"}
    assert limits[("org", "tokens_per_sec")]["source"] == "unlimited"
    assert limits[("env", "concurrency")] == {"kind": "concurrency", "value": 3, "source": "env override"}
    assert limits[("key", "tokens_per_min")] == {"kind": "tokens_per_min", "value": 1_000, "source": "key override"}
    assert ("env", "tokens_per_day") not in limits  # the env layer has no daily limit at all
    assert shown["region"] == "ap-south" and shown["plan"] == "free" and shown["ids"]["key"] == acme["key"]

    # Every value, known independently: the fixture's two overrides, the free plan's defaults of migration 002
    # (40,000 tokens/min, 60 requests/min, 1,000,000 tokens/day, concurrency 8), unlimited elsewhere. Both what
    # `show` prints and what the limiter enforces must be exactly this.
    expected = {(layer, kind): None for layer in ("org", "global") for kind in KINDS}
    expected.update({(layer, kind): None for layer in ("env", "key", "region") for kind in KINDS
                     if kind != "tokens_per_day"})
    expected.update({("org", "tokens_per_min"): 40_000, ("org", "requests_per_min"): 60,
                     ("org", "tokens_per_day"): 1_000_000, ("org", "concurrency"): 8, ("env", "concurrency"): 3,
                     ("key", "tokens_per_min"): 1_000})
    assert {where: limit["value"] for where, limit in limits.items()} == expected
    tenant, platform = enforced(database_url, acme["key"])
    layers = {"org": tenant.org, "env": tenant.env, "key": tenant.key, "global": platform.global_,
              "region": platform.for_region("ap-south")[1]}
    assert {(layer, kind): getattr(layers[layer], kind) for layer, kind in expected} == expected
    # Migration 002's layer policy: every layer fails open and none is in shadow mode.
    assert [(v["layer"], v["shadow"], v["fail_open"]) for v in shown["layers"]] == [
        (layer, False, True) for layer in ("org", "env", "key", "global", "region")]
    assert all((layers[layer].shadow, layers[layer].fail_open) == (False, True) for layer in layers)

    text = ok(cli("limits", "show", "--key", acme["key"])).out
    assert "plan default (free)" in text and "key override" in text and "40000" in text


def test_show_env_and_org_without_a_key_read_the_same_limits_and_leave_nothing_behind(cli, acme, database_url):
    ok(cli("limits", "set", "--org", "acme", "--tokens-per-sec", "70"))
    before = sql(database_url, "SELECT (SELECT count(*) FROM environments) AS e, (SELECT count(*) FROM api_keys) AS k,"
                               " (SELECT count(*) FROM audit_log) AS a")[0]
    sql(database_url, "INSERT INTO environments (org_id, name) VALUES ($1, 'empty')", uuid.UUID(acme["org"]))
    env_view = limits_of(ok(cli("limits", "show", "--env", "empty", "--org", "acme", "--json")).json())
    org_view = limits_of(ok(cli("limits", "show", "--org", "acme", "--json")).json())
    key_view = limits_of(ok(cli("limits", "show", "--key", acme["key"], "--json")).json())
    for kind in KINDS:  # the org layer is the same whichever way it is looked at
        assert env_view[("org", kind)] == org_view[("org", kind)] == key_view[("org", kind)]
    assert env_view[("org", "tokens_per_sec")]["source"] == "org override"
    assert env_view[("env", "concurrency")]["value"] is None  # "empty" has no override; prod's 3 is not shown
    assert not any(layer == "key" for layer, _ in env_view) and not any(layer == "env" for layer, _ in org_view)
    after = sql(database_url, "SELECT (SELECT count(*) FROM environments) AS e, (SELECT count(*) FROM api_keys) AS k,"
                              " (SELECT count(*) FROM audit_log) AS a")[0]
    assert (after["e"], after["k"], after["a"]) == (before["e"] + 1, before["k"], before["a"])  # no probe row stays


def test_attribution_names_the_most_specific_row_holding_the_value():
    from crosslogic.ratelimit.explain import attribute

    candidates = [("key override", None), ("env override", 500), ("plan default (free)", 500)]
    assert attribute(500, candidates) == "env override"
    assert attribute(None, candidates) == "unlimited"
    assert attribute(7, candidates) == "unattributed"


# ---------------------------------------------------------------- set / clear


def test_set_and_clear_write_the_row_with_an_audit_entry_and_show_follows(cli, acme, database_url):
    changed = ok(cli("limits", "set", "--org", "acme", "--tokens-per-min", "1000", "--shadow", "--actor", "alice",
                     "--json")).json()
    assert changed["changes"] == {"tokens_per_min": {"from": None, "to": 1000}, "shadow": {"from": False, "to": True}}
    row = sql(database_url, "SELECT rate_limit_tokens_per_min, rate_limit_shadow FROM orgs")[0]
    assert (row["rate_limit_tokens_per_min"], row["rate_limit_shadow"]) == (1000, True)
    shown = ok(cli("limits", "show", "--org", "acme", "--json")).json()
    assert limits_of(shown)[("org", "tokens_per_min")]["source"] == "org override"
    assert shown["layers"][0]["shadow"] is True and shown["layers"][0]["shadow_source"] == "org flag"

    ok(cli("limits", "clear", "--org", "acme", "tokens_per_min", "shadow"))
    assert limits_of(ok(cli("limits", "show", "--org", "acme", "--json")).json())[("org", "tokens_per_min")] == \
        {"kind": "tokens_per_min", "value": 40_000, "source": "plan default (free)"}
    audit = sql(database_url, "SELECT actor, action, target_type, target_id, details FROM audit_log "
                              "WHERE action LIKE 'limits.%' ORDER BY audit_id")
    assert [(a["actor"], a["action"], a["target_type"]) for a in audit] == \
        [("alice", "limits.set", "org"), ("test-operator", "limits.clear", "org")]
    assert audit[0]["target_id"] == acme["org"]
    assert json.loads(audit[1]["details"])["tokens_per_min"] == {"from": 1000, "to": None}


def test_env_key_quota_and_cap_settings(cli, acme, database_url):
    ok(cli("limits", "set", "--env", "prod", "--org", "acme", "--quota-tokens-per-hour", "0",
           "--max-tokens-per-request", "64", "--requests-per-min", "30"))
    ok(cli("limits", "set", "--key", acme["prefix"], "--concurrency", "2", "--no-shadow"))
    shown = ok(cli("limits", "show", "--key", acme["prefix"], "--json")).json()
    quotas = {(q["level"], q["kind"]): q for q in shown["quotas"]}
    assert quotas[("env", "quota_tokens_per_hour")]["value"] == 0  # zero is a quota: nothing may be spent
    assert quotas[("env", "max_tokens_per_request")]["value"] == 64
    assert limits_of(shown)[("env", "requests_per_min")]["value"] == 30
    assert limits_of(shown)[("key", "concurrency")] == {"kind": "concurrency", "value": 2, "source": "key override"}
    ok(cli("limits", "clear", "--key", acme["key"], "--all"))
    row = sql(database_url, "SELECT rate_limit_tokens_per_min, concurrency_limit FROM api_keys")[0]
    assert (row["rate_limit_tokens_per_min"], row["concurrency_limit"]) == (None, None)


def test_platform_layers_plan_defaults_and_layer_policy(cli, acme, database_url):
    ok(cli("limits", "set", "--global", "--tokens-per-day", "5000000000", "--concurrency", "900"))
    ok(cli("limits", "set", "--region", "ap-south", "--tokens-per-min", "90000"))
    ok(cli("limits", "set", "--plan", "free", "--requests-per-min", "10"))
    ok(cli("limits", "set", "--layer", "region", "--fail-closed", "--shadow"))
    shown = ok(cli("limits", "show", "--key", acme["key"], "--json")).json()
    limits = limits_of(shown)
    assert limits[("global", "tokens_per_day")] == {"kind": "tokens_per_day", "value": 5_000_000_000,
                                                    "source": "global_limits"}
    assert limits[("region", "tokens_per_min")]["source"] == "regions (ap-south)"
    assert limits[("org", "requests_per_min")] == {"kind": "requests_per_min", "value": 10,
                                                   "source": "plan default (free)"}
    region = next(layer for layer in shown["layers"] if layer["layer"] == "region")
    assert (region["fail_open"], region["shadow"]) == (False, True)
    _, platform = enforced(database_url, acme["key"])
    assert platform.global_.tokens_per_day == 5_000_000_000 and platform.for_region("ap-south")[1].fail_open is False

    ok(cli("limits", "clear", "--layer", "region", "--all"))
    policy = sql(database_url, "SELECT fail_open, shadow FROM rate_limit_layers WHERE layer = 'region'")[0]
    assert (policy["fail_open"], policy["shadow"]) == (True, False)


@pytest.mark.parametrize(("argv", "code", "words"), [
    (("--env", "prod", "--org", "acme", "--tokens-per-day", "10"), 2, ("env layer has no tokens_per_day",)),
    (("--key", "KEY", "--fail-closed"), 2, ("no fail_open", "--layer")),
    (("--region", "ap-south", "--shadow"), 2, ("no shadow", "--layer global|region")),
    (("--org", "acme", "--tokens-per-min", "0"), 2, ("tokens_per_min must be between 1",)),
    (("--org", "acme", "--concurrency", str(2**31)), 2, ("between 1 and 2,147,483,647",)),
    (("--org", "acme", "--quota-tokens-per-day", "-1"), 2, ("quota_tokens_per_day must be between 0",)),
    (("--org", "acme",), 2, ("nothing to change",)),
    (("--org", "acme", "--key", "KEY", "--concurrency", "1"), 2, ("exactly one target",)),
    (("--layer", "tenant", "--shadow"), 2, ("layer must be one of",)),
    (("--plan", "gold", "--concurrency", "1"), 2, ("plan must be one of",)),
    (("--org", "nope", "--concurrency", "1"), 1, ("nope", "not found")),
    (("--region", "mars", "--concurrency", "1"), 1, ("mars", "not found")),
])
def test_invalid_edits_are_refused_before_anything_is_written(cli, acme, database_url, argv, code, words):
    argv = tuple(acme["key"] if a == "KEY" else a for a in argv)
    before = [dict(r) for r in sql(database_url, "SELECT * FROM orgs")]
    refused(cli("limits", "set", *argv), code, *words)
    assert [dict(r) for r in sql(database_url, "SELECT * FROM orgs")] == before
    assert sql(database_url, "SELECT count(*) AS n FROM audit_log WHERE action LIKE 'limits.%'")[0]["n"] == 0


def test_clear_needs_settings_or_all_and_known_names(cli, acme):
    refused(cli("limits", "clear", "--org", "acme"), 2, "--all")
    refused(cli("limits", "clear", "--org", "acme", "tokens_per_min", "--all"), 2, "--all")
    refused(cli("limits", "clear", "--key", acme["key"], "quota_tokens_per_day"), 2, "key layer has no")
    ok(cli("limits", "clear", "--org", "acme", "tokens-per-min"))  # dashes work too


async def test_a_cli_change_reaches_a_running_limit_cache_through_notify(cli, acme, database_url):
    async with open_pool(database_url) as pool:
        # An hour-long cache: only the change notification can make the new values visible in this test.
        store = LimitStore(pool, ttl_s=3600)
        cleared: list[int] = []

        def clear() -> None:
            cleared.append(1)
            store.clear()

        async def listening() -> bool:  # the feed clears once right after its LISTEN
            return bool(cleared)

        feed = asyncio.create_task(follow_limit_changes(database_url, clear))
        try:
            await wait_for(listening, "the change feed to listen")
            assert (await store.for_key(acme["key"])).key.requests_per_min is None
            assert (await store.platform()).global_.concurrency is None

            async def after(*argv: str, check) -> None:
                ok(await asyncio.to_thread(cli, "limits", "set", *argv))

                async def applied():
                    return check(await store.for_key(acme["key"]), await store.platform())

                await wait_for(applied, f"limits {' '.join(argv)} to reach the cache")

            await after("--key", acme["prefix"], "--requests-per-min", "5",
                        check=lambda t, p: t.key.requests_per_min == 5)
            await after("--global", "--concurrency", "77", check=lambda t, p: p.global_.concurrency == 77)
            await after("--layer", "key", "--shadow", check=lambda t, p: t.key.shadow)
            await after("--plan", "free", "--tokens-per-day", "123", check=lambda t, p: t.org.tokens_per_day == 123)
        finally:
            feed.cancel()


# ---------------------------------------------------------------- usage


async def test_live_reader_matches_the_levels_the_engine_reports(valkey_url):
    redis = aioredis.from_url(valkey_url)
    now = [50_000_000]
    limiter = Limiter(redis, clock=lambda: now[0])
    org, env, key = (str(uuid.uuid4()) for _ in range(3))
    limits = (LayerLimits(tokens_per_min=10_000, tokens_per_day=1_000_000, requests_per_min=60),
              LayerLimits(tokens_per_sec=500, concurrency=4), LayerLimits(tokens_per_min=3_000))
    scope = tenant_scope(org, env, key)
    tenant = TenantLimits(*limits)
    try:
        first = await limiter.reserve(org, env, key, "r1", 1_234, tenant)
        usage = await live.scope_usage(redis, scope, limits, now[0])
        by_kind = {(u.layer, b.kind): b.level for u in usage for b in u.buckets}
        assert by_kind == {(b.layer, b.kind): b.level for b in first.buckets}
        # Charged = settled tokens: nothing before settlement.
        assert [(u.layer, u.leases, u.charged) for u in usage] == [("org", None, 0), ("env", 1, 0), ("key", None, 0)]
        now[0] += 7_777  # refilled since: the reader refills as the next decision will
        seen = {(u.layer, b.kind): b.level for u in await live.scope_usage(redis, scope, limits, now[0])
                for b in u.buckets}
        second = await limiter.reserve(org, env, key, "r2", 100, tenant)
        for b in second.buckets:
            assert b.level == seen[(b.layer, b.kind)] - (1 if b.kind == "requests_per_min" else min(100, b.capacity))
        assert await limiter.settle(org, env, key, "r1", 1_000)
        after = await live.scope_usage(redis, scope, limits, now[0])
        assert [(u.leases, u.charged) for u in after][1] == (1, 1_000)  # r2 still holds its lease
    finally:
        await redis.aclose()


def test_usage_shows_live_buckets_leases_charged_and_quotas(cli, acme, valkey_url, database_url):
    ok(cli("limits", "set", "--key", acme["key"], "--concurrency", "2"))
    ok(cli("limits", "set", "--org", "acme", "--quota-tokens-per-day", "50000"))

    async def reserve() -> None:
        redis = aioredis.from_url(valkey_url)
        try:
            async with open_pool(database_url) as pool:
                tenant = await LimitStore(pool).for_key(acme["key"])
            limiter, ids = Limiter(redis), (acme["org"], acme["env"], acme["key"])
            settled, held = uuid.uuid4().hex, uuid.uuid4().hex
            assert (await limiter.reserve(*ids, settled, 400, tenant)).admitted
            assert await limiter.settle(*ids, settled, 400)
            assert (await limiter.reserve(*ids, held, 400, tenant)).admitted
        finally:
            await redis.aclose()

    asyncio.run(reserve())
    usage = ok(cli("limits", "usage", "--key", acme["prefix"], "--json")).json()
    layers = {u["layer"]: u for u in usage["layers"]}
    assert layers["key"]["leases"] == 1 and layers["key"]["concurrency"] == 2 and layers["env"]["leases"] == 1
    assert {u["charged"] for u in usage["layers"]} == {400}
    key_tpm = next(b for b in layers["key"]["buckets"] if b["kind"] == "tokens_per_min")
    assert key_tpm["capacity"] == 1_000 and key_tpm["level"] <= key_tpm["capacity"]
    assert {(q["level"], q["period"], q["quota"]) for q in usage["quotas"]} >= {("org", "day", 50_000)}
    assert "LEASES" in ok(cli("limits", "usage", "--key", acme["key"])).out


def test_usage_without_redis_configuration_is_a_clear_error(cli, acme, monkeypatch):
    monkeypatch.delenv("CROSSLOGIC_REDIS_URL")
    refused(cli("limits", "usage", "--key", acme["key"]), 2, "CROSSLOGIC_REDIS_URL")
    refused(cli("limits", "usage"), 2, "--key")


def test_settable_kinds_are_the_limiters_kinds():
    assert limit_overrides.RATE_KINDS == KINDS
    assert set(limit_overrides.TARGETS["org"].settings) >= set(KINDS)


# ---------------------------------------------------------------- through the running gateway


async def _crosslogic(gateway: dict, *argv: str) -> Any:
    """The command as an operator runs it next to `crosslogic up`: settings from the stack's state dir."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crosslogic", "--state-dir", gateway["state_dir"], *argv, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_an_edit_reaches_the_running_gateway_and_usage_agrees_with_the_ledger(gateway):
    tenant = await limited_tenant(gateway)
    key = tenant["keys"][0]
    api = client(gateway, key["api_key"])
    messages = [{"role": "user", "content": "hello"}]
    await api.chat.completions.create(model="llama-3-8b", messages=messages, max_tokens=5)  # limits now cached
    await _crosslogic(gateway, "limits", "set", "--key", key["key_id"], "--requests-per-min", "1")

    async def limited() -> bool:
        try:
            await api.chat.completions.create(model="llama-3-8b", messages=messages, max_tokens=5)
            return False
        except openai.RateLimitError as refusal:
            return "API key" in refusal.message and "requests per minute" in refusal.message

    await wait_for(limited, "the running ext_authz to apply the new key limit")

    async def settled():
        usage = await _crosslogic(gateway, "limits", "usage", "--key", key["key_id"])
        charged = {u["layer"]: u["charged"] for u in usage["layers"]}
        _, billed = await ledger_for_key(gateway, key["key_id"])
        return usage if billed > 0 and charged["key"] == charged["env"] == charged["org"] == billed else None

    usage = await wait_for(settled, "limiter counters equal to the ledger after settlement")
    key_layer = next(u for u in usage["layers"] if u["layer"] == "key")
    assert [(b["kind"], b["capacity"]) for b in key_layer["buckets"]] == [("requests_per_min", 1)]

    await _crosslogic(gateway, "limits", "clear", "--key", key["key_id"], "requests_per_min")

    async def flows_again() -> bool:
        return not await limited()

    await wait_for(flows_again, "the cleared limit to stop refusing")


def test_one_rule_in_shadow_mode_is_set_shown_and_cleared(cli, acme, database_url):
    ok(cli("limits", "set", "--key", acme["prefix"], "--tokens-per-min", "500", "--requests-per-min", "5",
           "--shadow-limits", "tokens_per_min"))
    key = next(v for v in ok(cli("limits", "show", "--key", acme["prefix"], "--json")).json()["layers"]
               if v["layer"] == "key")
    assert (key["shadow"], key["shadow_limits"]) == (False, ["tokens_per_min"])
    refused(cli("limits", "set", "--key", acme["prefix"], "--shadow-limits", "tokens_per_week"), 2, "limit kinds")
    ok(cli("limits", "clear", "--key", acme["prefix"], "shadow_limits"))
    assert sql(database_url, "SELECT rate_limit_shadow_limits FROM api_keys")[0]["rate_limit_shadow_limits"] == []


def test_a_test_keys_limits_are_the_test_key_caps_shown_and_enforced_alike(cli, acme, database_url, key_secret):
    async def make() -> tenancy.ApiKeyRecord:
        conn = await asyncpg.connect(database_url)
        try:
            key, _ = await tenancy.create_key(conn, key_secret.encode(), "acme", "prod", "ci-test",
                                              rate_limit_tokens_per_min=9_000, mode="test")
            return key
        finally:
            await conn.close()

    key = asyncio.run(make())
    shown = ok(cli("limits", "show", "--key", key.key_id, "--json")).json()
    limits = limits_of(shown)
    assert shown["key_mode"] == "test"
    # Migration 012's caps (5,000 tokens/min, 10 requests/min, concurrency 2) win over the key's own 9,000.
    assert limits[("key", "tokens_per_min")] == {"kind": "tokens_per_min", "value": 5_000, "source": "test-key cap"}
    assert limits[("key", "requests_per_min")]["value"] == 10 and limits[("key", "concurrency")]["value"] == 2
    assert {q["kind"]: q["value"] for q in shown["quotas"]}["max_tokens_per_request"] == 256
    tenant, _ = enforced(database_url, key.key_id)
    assert (tenant.key.tokens_per_min, tenant.key.requests_per_min, tenant.key.concurrency) == (5_000, 10, 2)

    changed = ok(cli("limits", "set", "--test-keys", "--tokens-per-min", "2000", "--max-tokens-per-request", "64",
                     "--json")).json()
    assert changed["layer"] == "test_keys" and changed["changes"]["tokens_per_min"] == {"from": 5000, "to": 2000}
    assert enforced(database_url, key.key_id)[0].key.tokens_per_min == 2_000
    assert enforced(database_url, acme["key"])[0].key.tokens_per_min == 1_000  # a live key: not capped
    ok(cli("limits", "clear", "--test-keys", "requests_per_min"))
    shown = ok(cli("limits", "show", "--key", key.key_id, "--json")).json()
    assert limits_of(shown)[("key", "requests_per_min")]["value"] is None
    assert {q["kind"]: q["value"] for q in shown["quotas"]}["max_tokens_per_request"] == 64
    (audit,) = sql(database_url, "SELECT count(*) AS n FROM audit_log WHERE target_type = 'test_key_limits'")
    assert audit["n"] == 2
    refused(cli("limits", "set", "--test-keys", "--tokens-per-day", "5"), 2, "tokens_per_day")
    text = ok(cli("limits", "show", "--key", key.key_id)).out
    assert text.startswith("test key " + key.key_prefix) and "test-key cap" in text
