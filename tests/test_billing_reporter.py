"""Billing reporter: real ledger, real `stripe` SDK, local Stripe-compatible server; exactly-once exports."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest

from crosslogic.accounting.ledger import write_batch
from crosslogic.accounting.reporter import BillingReporter, ReporterSettings, stripe_client
from crosslogic.accounting.usage import UsageRecord
from tests.billing_helpers import API_KEY, local_stripe


async def _org(conn: asyncpg.Connection, plan: str = "serverless", free: int = 0, reserved_tps: int = 0) -> str:
    await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('r1', 'R1') ON CONFLICT DO NOTHING")
    await conn.execute("INSERT INTO models (model_id, input_price_microdollars_per_1m, "
                       "output_price_microdollars_per_1m) VALUES ('m1', 1000000, 2000000) ON CONFLICT DO NOTHING")
    return str(await conn.fetchval(
        "INSERT INTO orgs (name, billing_plan, free_tokens_per_month, reserved_capacity_tokens_per_sec, "
        "stripe_customer_id) VALUES ($1, $2, $3, $4, $5) RETURNING org_id",
        f"org-{uuid.uuid4().hex[:6]}", plan, free, reserved_tps, f"cus_{uuid.uuid4().hex[:10]}"))


async def _usage(conn: asyncpg.Connection, org: str, count: int, prompt: int = 100, completion: int = 50) -> None:
    now = datetime.now(UTC)
    records = [UsageRecord(request_id=str(uuid.uuid4()), occurred_at=now - timedelta(seconds=i), org_id=org,
                           env_id=str(uuid.uuid4()), key_id=str(uuid.uuid4()), region="r1", model="m1",
                           endpoint="chat.completions", streamed=False, status_code=200, prompt_tokens=prompt,
                           completion_tokens=completion, usage_source="reported", latency_ms=1, node=None)
               for i in range(count)]
    assert (await write_batch(conn, records)).inserted == count


async def _stripe_total(fake, customer: str) -> int:
    return sum(int(e["payload"]["value"]) for e in fake.events if e["payload"]["stripe_customer_id"] == customer)


@pytest.fixture
async def pool(database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    yield pool
    await pool.close()


def _reporter(pool, base: str, **kwargs) -> BillingReporter:
    return BillingReporter(pool, stripe_client(API_KEY, base), ReporterSettings(**kwargs))


async def test_usage_reaches_stripe_once_with_the_free_tier_taken_off_and_a_rerun_sends_nothing(pool):
    async with pool.acquire() as conn:
        org = await _org(conn, free=1_000)  # 150 tokens per request: 6 free, the 7th partly
        await _usage(conn, org, 20)
    async with local_stripe() as (fake, base):
        reporter = _reporter(pool, base)
        first = await reporter.run_once()
        assert first.failed == 0 and first.sent == first.exports_prepared >= 1
        async with pool.acquire() as conn:
            customer = await conn.fetchval("SELECT stripe_customer_id FROM orgs WHERE org_id = $1",
                                           uuid.UUID(org))
            ledger = await conn.fetchrow(
                "SELECT sum(cost_microdollars) AS cost, sum(billable_microdollars) AS billable, "
                "sum(free_tokens) AS free, bool_and(billed) AS billed FROM usage_records")
        # 100 * $1 + 50 * $2 per 1M = 200 micro-dollars a request; 1,000 free tokens = 6 2/3 requests.
        assert (ledger["cost"], ledger["free"], ledger["billed"]) == (4000, 1000, True)
        assert ledger["billable"] == 4000 - 1333
        assert await _stripe_total(fake, customer) == ledger["billable"]

        events = len(fake.events)
        again = await reporter.run_once()
        assert (again.exports_prepared, again.sent, len(fake.events)) == (0, 0, events)


async def test_stripe_outage_marks_rows_failed_and_the_retry_bills_them_exactly_once(pool):
    async with pool.acquire() as conn:
        org = await _org(conn)
        await _usage(conn, org, 5)
    async with local_stripe() as (fake, base):
        reporter = _reporter(pool, base, retry_base_s=3600)
        await reporter.ensure_meter()
        fake.fail_next, fake.fail_status = 10_000, 503
        failed = await reporter.run_once()
        assert failed.sent == 0 and failed.failed >= 1
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT billed, billing_failed, retry_count FROM usage_records")
            assert all(not r["billed"] and r["billing_failed"] and r["retry_count"] == 1 for r in rows)
            # Backoff: nothing is due yet, so a run sends nothing even though Stripe is back.
            fake.fail_next = 0
            assert (await reporter.run_once()).sent == 0
            await conn.execute("UPDATE billing_exports SET next_attempt_at = now()")
        retried = await reporter.run_once()
        assert retried.sent == failed.failed and retried.failed == 0
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT bool_and(billed AND NOT billing_failed) FROM usage_records")
            total = await conn.fetchval("SELECT sum(billable_microdollars) FROM usage_records")
            customer = await conn.fetchval("SELECT stripe_customer_id FROM orgs")
        assert await _stripe_total(fake, customer) == total == 1000


async def test_an_answer_lost_after_stripe_accepted_is_not_billed_twice(pool):
    async with pool.acquire() as conn:
        org = await _org(conn)
        await _usage(conn, org, 3)
    async with local_stripe() as (fake, base):
        reporter = _reporter(pool, base)
        await reporter.ensure_meter()
        async with pool.acquire() as conn:
            from crosslogic.accounting.reporter import prepare_exports

            assert await prepare_exports(conn, reporter.settings) >= 1
            due = await conn.fetch("SELECT * FROM billing_exports")
        for export in due:  # Stripe accepted these, then we "crashed" before recording it
            await reporter._send_one(export)
        resent = await reporter.run_once()
        assert resent.sent == len(due) and resent.failed == 0
        customer = due[0]["stripe_customer_id"]
        assert await _stripe_total(fake, customer) == 600 and len(fake.events) == len(due)


async def test_reserved_capacity_usage_is_tracked_but_not_billed_within_the_included_capacity(pool):
    async with pool.acquire() as conn:
        org = await _org(conn, plan="reserved", reserved_tps=10)
        await _usage(conn, org, 4)
    async with local_stripe() as (fake, base):
        await _reporter(pool, base).run_once()
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT sum(cost_microdollars) AS cost, sum(billable_microdollars) AS b, "
                                  "sum(total_tokens) AS t, bool_and(billed) AS billed FROM usage_records")
    assert (row["cost"], row["b"], row["t"], row["billed"]) == (800, 0, 600, True)


async def test_the_local_stripe_speaks_stripes_error_and_idempotency_rules():
    async with local_stripe() as (fake, base), aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/billing/meters", data={"event_name": "x"},
                             headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401 and (await r.json())["error"]["type"] == "invalid_request_error"
        auth = {"Authorization": f"Bearer {API_KEY}"}
        async with http.post(f"{base}/v1/billing/meters", data={"event_name": "x"}, headers=auth) as r:
            assert r.status == 200
        event = {"event_name": "x", "payload[stripe_customer_id]": "cus_1", "payload[value]": "5", "identifier": "i1"}
        key = {**auth, "Idempotency-Key": "k1"}
        async with http.post(f"{base}/v1/billing/meter_events", data=event, headers=key) as r:
            first = await r.json()
        async with http.post(f"{base}/v1/billing/meter_events", data=event, headers=key) as r:
            assert r.headers["Idempotent-Replayed"] == "true" and await r.json() == first
        async with http.post(f"{base}/v1/billing/meter_events", data={**event, "payload[value]": "6"},
                             headers=key) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "idempotency_error"
        async with http.post(f"{base}/v1/billing/meter_events", data=event, headers=auth) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "resource_already_exists"
        assert len(fake.events) == 1


async def test_reconciliation_finds_what_stripe_lost_and_sends_it_again_once(pool):
    from crosslogic.accounting.reconcile import reconcile

    async with pool.acquire() as conn:
        org = await _org(conn)
        await _usage(conn, org, 4)
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    async with local_stripe() as (fake, base):
        reporter = _reporter(pool, base)
        await reporter.run_once()
        clean = await reconcile(pool, reporter.client, start, end)
        assert [(o.org_id, o.drift, o.not_yet_exported_rows) for o in clean.orgs] == [(org, 0, 0)]
        assert clean.requeued_orgs == []

        lost = fake.events.pop()  # Stripe "lost" an event it had accepted
        fake.identifiers.discard(lost["identifier"])
        drift = await reconcile(pool, reporter.client, start, end)
        assert drift.orgs[0].drift == -int(lost["payload"]["value"]) and drift.requeued_orgs == [org]
        resent = await reporter.run_once()
        assert resent.failed == 0
        after = await reconcile(pool, reporter.client, start, end)
        assert after.orgs[0].drift == 0 and after.orgs[0].stripe_microdollars == 800


def test_vllm_token_counters_are_read_per_model():
    from crosslogic.accounting.reconcile import parse_engine_token_counters

    text = """# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="llama-3-8b"} 120.0
vllm:prompt_tokens_created{engine="0",model_name="llama-3-8b"} 1.7e9
vllm:generation_tokens_total{engine="0",model_name="llama-3-8b"} 45.0
vllm:prompt_tokens_total{engine="0",model_name="bge-small"} 7.0
"""
    assert parse_engine_token_counters(text) == {"llama-3-8b": (120, 45), "bge-small": (7, 0)}


async def test_sglang_token_counters_are_read_from_the_simulators_sglang_persona():
    """Reconciliation reads an SGLang node too: the counters after real requests to `--engine sglang`."""
    from crosslogic.accounting.reconcile import parse_engine_token_counters
    from crosslogic.sim.server import SimulatorConfig, running_simulator

    async with running_simulator(SimulatorConfig(models=("qwen-7b",), engine="sglang")) as sim:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(sim.url + "/v1/completions", json={"model": "qwen-7b", "prompt": "hello there",
                                                                      "max_tokens": 4}) as response:
                    usage = (await response.json())["usage"]
            async with http.get(sim.url + "/metrics") as response:
                text = await response.text()
    prompt, generated = parse_engine_token_counters(text)["qwen-7b"]
    assert (prompt, generated) == (3 * usage["prompt_tokens"], 3 * usage["completion_tokens"])


def test_rank_copies_of_an_sglang_counter_count_once():
    from crosslogic.accounting.reconcile import parse_engine_token_counters

    text = "".join(f'sglang:generation_tokens_total{{model_name="m",tp_rank="{r}"}} 40.0\n' for r in range(4))
    assert parse_engine_token_counters(text + 'sglang:prompt_tokens_total{model_name="m"} 9.0\n') == {"m": (9, 40)}
