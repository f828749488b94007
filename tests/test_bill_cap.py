"""Monthly bill caps: 403 billing_cap_reached at the gateway, alerts before the cap, optional auto-suspend."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import openai
import pytest

from crosslogic.accounting.guardrails import check_caps, thresholds_crossed
from crosslogic.store import tenancy
from tests.gateway_helpers import client, ledger_row

MESSAGES = [{"role": "user", "content": "hello there"}]


async def _tenant(gateway: dict) -> dict:
    from pathlib import Path

    secret = (Path(gateway["state_dir"]) / "key_secret").read_text().strip().encode()
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        org = await tenancy.create_org(conn, "cap-" + uuid.uuid4().hex[:8], region_preferences=["ap-south"])
        env = await tenancy.create_env(conn, org.org_id, "prod", region="ap-south")
        _, plaintext = await tenancy.create_key(conn, secret, org.org_id, env.env_id, name="k")
        return {"org_id": str(org.org_id), "api_key": plaintext}
    finally:
        await conn.close()


async def _refused_with(api, code: str, within_s: float = 30.0) -> openai.APIStatusError:
    deadline = time.monotonic() + within_s
    while True:
        try:
            await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=2)
        except openai.APIStatusError as exc:
            if exc.body and exc.body.get("code") == code:
                return exc
            raise
        assert time.monotonic() < deadline, f"never refused with {code}"
        await asyncio.sleep(0.3)


async def test_an_org_over_its_monthly_cap_gets_403_billing_cap_reached_and_others_do_not(gateway):
    tenant = await _tenant(gateway)
    api = client(gateway, tenant["api_key"])
    raw = await api.chat.completions.with_raw_response.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5)
    await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        # The cap counts what is owed after the free tier: without one, this org owes every request's cost.
        await conn.execute("UPDATE orgs SET monthly_bill_cap_microdollars = 1, free_tokens_per_month = 0 "
                           "WHERE org_id = $1", uuid.UUID(tenant["org_id"]))
    finally:
        await conn.close()
    refused = await _refused_with(api, "billing_cap_reached")
    assert refused.status_code == 403
    assert refused.body["type"] == "insufficient_quota" and set(refused.body) == {"message", "type", "param", "code"}
    # The demo org has no cap: it is not affected.
    ok = await client(gateway).chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=1)
    assert ok.usage.completion_tokens == 1


async def test_crossing_the_cap_alerts_once_per_threshold_and_suspends_orgs_that_asked(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        org = await conn.fetchval("INSERT INTO orgs (name, monthly_bill_cap_microdollars, suspend_at_cap) "
                                  "VALUES ('o', 1000, true) RETURNING org_id")
        month = await conn.fetchval("SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date")
        await conn.execute("INSERT INTO org_monthly_spend (org_id, month, cost_microdollars, tokens, "
                           "owed_microdollars) VALUES ($1, $2, 900, 1, 850)", org, month)
        assert await check_caps(conn) == [f"alert:{org}:80"]
        assert await check_caps(conn) == []
        await conn.execute("UPDATE org_monthly_spend SET owed_microdollars = 1000")
        assert await check_caps(conn) == [f"alert:{org}:100", f"suspend:{org}"]
        assert await conn.fetchval("SELECT status FROM orgs WHERE org_id = $1", org) == "suspended"
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE action = 'org.suspend'") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize(("spent", "cap", "expected"), [(0, 100, []), (79, 100, []), (80, 100, [80]),
                                                       (100, 100, [80, 100]), (1, 0, [80, 100])])
def test_alert_thresholds_are_exact_percentages_of_the_cap(spent, cap, expected):
    assert thresholds_crossed(spent, cap) == expected
