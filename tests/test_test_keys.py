"""Test API keys (migration 012): free in the ledger, outside every part of billing, and capped at admission."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import openai
import pytest

from crosslogic.accounting import metrics
from crosslogic.accounting.ledger import write_batch
from crosslogic.accounting.reporter import BillingReporter, ReporterSettings, observe_billing_state, stripe_client
from crosslogic.accounting.usage import UsageRecord
from crosslogic.store import tenancy, usage_queries
from tests.billing_helpers import API_KEY, local_stripe
from tests.gateway_helpers import client, ledger_row

SECRET = b"test-keys-secret"
MESSAGES = [{"role": "user", "content": "hello there"}]


def _record(key: tenancy.ApiKeyRecord, model: str = "m1", at: datetime | None = None) -> UsageRecord:
    return UsageRecord(request_id=str(uuid.uuid4()), occurred_at=at or datetime.now(UTC), org_id=key.org_id,
                       env_id=key.env_id, key_id=key.key_id, region="r1", model=model, endpoint="chat.completions",
                       streamed=False, status_code=200, prompt_tokens=100, completion_tokens=50,
                       usage_source="reported", latency_ms=1, node=None)


async def _org_with_keys(conn: asyncpg.Connection, *, free: int) -> tuple[str, tenancy.ApiKeyRecord,
                                                                           tenancy.ApiKeyRecord]:
    await tenancy.add_region(conn, "r1", "R1")
    await tenancy.add_model(conn, "m1", input_price_microdollars_per_1m=1_000_000,
                            output_price_microdollars_per_1m=2_000_000)
    org = await tenancy.create_org(conn, "org-" + uuid.uuid4().hex[:6], region_preferences=["r1"])
    await conn.execute("UPDATE orgs SET free_tokens_per_month = $2, stripe_customer_id = $3, "
                       "monthly_bill_cap_microdollars = 1000000 WHERE org_id = $1",
                       uuid.UUID(org.org_id), free, "cus_" + uuid.uuid4().hex[:10])
    env = await tenancy.create_env(conn, org.org_id, "prod", region="r1")
    live, _ = await tenancy.create_key(conn, SECRET, org.org_id, env.env_id, name="live")
    test, plaintext = await tenancy.create_key(conn, SECRET, org.org_id, env.env_id, name="ci", mode="test")
    assert test.mode == "test" and plaintext.startswith("clsk_test_") and live.mode == "live"
    return org.org_id, live, test


@pytest.fixture
async def pool(database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    yield pool
    await pool.close()


async def test_test_usage_is_in_the_ledger_at_cost_0_and_in_no_spend_free_tier_cap_or_stripe_export(pool):
    async with pool.acquire() as conn:
        org, live, test = await _org_with_keys(conn, free=150)  # the free tier covers one live request exactly
        # Test rows first: were they counted, they would use up the free tier before the live row.
        batch = [_record(test, at=datetime.now(UTC) - timedelta(seconds=10 - i)) for i in range(5)]
        batch.append(_record(test, model="no-such-price"))  # a test row needs no price: never held
        batch += [_record(live), _record(live)]
        result = await write_batch(conn, batch)
        assert (result.inserted, result.held) == (8, 0)
        # Only the live rows are the capped org's to settle (a test request holds no bill-cap reservation).
        assert [set(o.request_ids) for o in result.owed] == [{batch[-2].request_id, batch[-1].request_id}]
        rows = await conn.fetch("SELECT mode, cost_microdollars, price_version_id FROM usage_records "
                                "WHERE key_id = $1", uuid.UUID(test.key_id))
        assert len(rows) == 6 and {(r["mode"], r["cost_microdollars"], r["price_version_id"]) for r in rows} == \
            {("test", 0, None)}
        spend = await conn.fetchrow("SELECT cost_microdollars, tokens, free_tokens, owed_microdollars "
                                    "FROM org_monthly_spend WHERE org_id = $1", uuid.UUID(org))
        # Two live requests of 200 micro-dollars, 150 tokens each; the first is free, the second owed.
        assert dict(spend) == {"cost_microdollars": 400, "tokens": 300, "free_tokens": 150, "owed_microdollars": 200}
        customer = await conn.fetchval("SELECT stripe_customer_id FROM orgs WHERE org_id = $1", uuid.UUID(org))
        # What the developer sees: test usage beside the live usage, at $0, and outside the month's bill.
        series = await usage_queries.usage_series(conn, usage_queries.SeriesQuery(org_id=org, group_by="mode"))
        by_mode = {}
        for r in series:
            tokens, cost = by_mode.get(r["group"], (0, 0))
            by_mode[r["group"]] = (tokens + r["total_tokens"], cost + r["cost_microdollars"])
        assert by_mode == {"live": (300, 400), "test": (900, 0)}
        only_test = await usage_queries.usage_series(conn, usage_queries.SeriesQuery(org_id=org, mode="test"))
        assert sum(r["requests"] for r in only_test) == 6
        month = await usage_queries.org_month(conn, org)
        assert month["test_usage"] == {"requests": 6, "tokens": 900}
        assert (month["tokens"], month["free_tier"]["used_tokens"], month["owed_microdollars"]) == (300, 150, 200)

    async with local_stripe() as (fake, base):
        reporter = BillingReporter(pool, stripe_client(API_KEY, base), ReporterSettings())
        run = await reporter.run_once()
        assert run.failed == 0 and run.sent >= 1
        events = [e for e in fake.events if e["payload"]["stripe_customer_id"] == customer]
        # Exactly the live billable amount: the free tier went to the first live row, not to test rows.
        assert sum(int(e["payload"]["value"]) for e in events) == 200
        again = await reporter.run_once()
        assert (again.exports_prepared, again.sent) == (0, 0)
    async with pool.acquire() as conn:
        test_rows = await conn.fetchrow("SELECT count(*) FILTER (WHERE export_id IS NOT NULL) AS exported, "
                                        "count(*) FILTER (WHERE billed) AS billed FROM usage_records "
                                        "WHERE mode = 'test'")
        assert dict(test_rows) == {"exported": 0, "billed": 0}
        assert await conn.fetchval("SELECT bool_and(billed) FROM usage_records WHERE mode = 'live'") is True
        await observe_billing_state(conn)  # never-billed test rows are not "unbilled" (no stuck-export alert)
        assert metrics.unbilled_rows._value.get() == 0


async def _gateway_tenant(gateway: dict) -> dict:
    secret = (Path(gateway["state_dir"]) / "key_secret").read_text().strip().encode()
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        org = await tenancy.create_org(conn, "tk-" + uuid.uuid4().hex[:8], region_preferences=["ap-south"])
        env = await tenancy.create_env(conn, org.org_id, "prod", region="ap-south")
        live, live_key = await tenancy.create_key(conn, secret, org.org_id, env.env_id, name="live")
        test, test_key = await tenancy.create_key(conn, secret, org.org_id, env.env_id, name="ci", mode="test")
        return {"org_id": org.org_id, "live": live_key, "test": test_key, "test_key_id": test.key_id}
    finally:
        await conn.close()


async def _spend(database_url: str, org_id: str) -> tuple | None:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT cost_microdollars, tokens, free_tokens, owed_microdollars "
                                  "FROM org_monthly_spend WHERE org_id = $1", uuid.UUID(org_id))
        return tuple(row) if row else None
    finally:
        await conn.close()


async def test_a_test_key_works_through_the_gateway_free_and_keeps_working_past_the_bill_cap(gateway):
    tenant = await _gateway_tenant(gateway)
    live, test = client(gateway, tenant["live"]), client(gateway, tenant["test"])
    raw = await test.chat.completions.with_raw_response.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5)
    answer = raw.parse()
    assert answer.usage.completion_tokens == 5 and answer.choices[0].message.content
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert (row["mode"], row["cost_microdollars"], row["total_tokens"]) == ("test", 0, answer.usage.total_tokens)
    assert row["total_tokens"] > 0
    assert await _spend(gateway["database_url"], tenant["org_id"]) is None  # no month's spend at all

    raw = await live.chat.completions.with_raw_response.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5)
    live_row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert live_row["mode"] == "live" and live_row["cost_microdollars"] > 0
    spend = await _spend(gateway["database_url"], tenant["org_id"])
    assert spend is not None and spend[1] == live_row["total_tokens"]  # the live request's tokens only

    conn = await asyncpg.connect(gateway["database_url"])
    try:
        await conn.execute("UPDATE orgs SET monthly_bill_cap_microdollars = 1, free_tokens_per_month = 0 "
                           "WHERE org_id = $1", uuid.UUID(tenant["org_id"]))
    finally:
        await conn.close()
    deadline = time.monotonic() + 30
    while True:  # the live key is refused once the cap (re-read within a second) shows what is owed
        try:
            # max_tokens=5 as above, whose cost was > 0 (a 1-token answer may round to 0 micro-dollars)
            await live.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5)
        except openai.PermissionDeniedError as exc:
            assert exc.body["code"] == "billing_cap_reached"
            break
        assert time.monotonic() < deadline, "the live key was never refused at the cap"
        await asyncio.sleep(0.3)
    before = await _spend(gateway["database_url"], tenant["org_id"])
    raw = await test.chat.completions.with_raw_response.create(model="llama-3-8b", messages=MESSAGES, max_tokens=2)
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert (row["mode"], row["cost_microdollars"]) == ("test", 0)
    assert await _spend(gateway["database_url"], tenant["org_id"]) == before


async def test_a_test_key_gets_its_own_low_limits_as_openai_errors(gateway):
    tenant = await _gateway_tenant(gateway)
    test = client(gateway, tenant["test"])
    with pytest.raises(openai.BadRequestError) as too_long:  # test_key_limits.max_tokens_per_request = 256
        await test.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=257)
    assert too_long.value.body["param"] == "max_tokens" and "256" in too_long.value.body["message"]
    # requests_per_min = 10: a burst of requests is refused within a few more than ten (the bucket refills
    # one every 6 s, so how many pass depends only on how long the burst takes, never on a timing assertion).
    admitted = 0
    for _ in range(30):
        try:
            await test.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=1)
            admitted += 1
        except openai.RateLimitError as exc:
            assert set(exc.body) == {"message", "type", "param", "code"}
            assert exc.body["code"] == "rate_limit_exceeded" and "API key" in exc.body["message"]
            assert "requests per minute" in exc.body["message"]
            assert int(exc.response.headers["retry-after"]) >= 1
            break
    else:
        pytest.fail("a test key was never rate-limited")
    assert admitted >= 10  # the bucket's capacity passed before the first refusal
    # The live key of the same environment is not limited by the test key's caps.
    live = client(gateway, tenant["live"])
    ok = await live.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=300)
    assert ok.usage.completion_tokens > 0
