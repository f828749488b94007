"""Pricing maths (pure, property-tested) and prices versioned by effective date in the real ledger."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from hypothesis import given
from hypothesis import strategies as st

from crosslogic.accounting.ledger import PriceBook, write_batch
from crosslogic.accounting.pricing import (
    PPM,
    ModelPrice,
    OrgTerms,
    allocate_allowance,
    cost_microdollars,
    effective_at,
)
from crosslogic.accounting.usage import UsageRecord

tokens = st.integers(0, 10_000_000)
prices = st.builds(ModelPrice, st.integers(0, 100_000_000), st.integers(0, 100_000_000))
multipliers = st.integers(1, 5 * PPM)


@given(tokens, tokens, prices, multipliers)
def test_cost_is_the_exact_product_rounded_half_up_once(prompt, completion, price, region):
    exact_numerator = (prompt * price.input_microdollars_per_1m
                       + completion * price.output_microdollars_per_1m) * region
    denominator = 1_000_000 * PPM
    cost = cost_microdollars(prompt, completion, price, region)
    assert abs(cost * denominator - exact_numerator) * 2 <= denominator


@given(tokens, tokens, prices, multipliers, st.integers(1, 2 * PPM), st.integers(0, PPM))
def test_tiers_and_discounts_never_cost_more_than_the_list_price_scaled(prompt, completion, price, region, tier,
                                                                       discount):
    plain = cost_microdollars(prompt, completion, price, region, OrgTerms(tier, 0))
    discounted = cost_microdollars(prompt, completion, price, region, OrgTerms(tier, discount))
    assert 0 <= discounted <= plain
    assert cost_microdollars(prompt, completion, price, region, OrgTerms(tier, PPM)) == 0


def test_embeddings_pay_input_price_only_and_india_pays_seven_tenths():
    embedding = ModelPrice(10_000, 0)
    assert cost_microdollars(1_000_000, 0, embedding) == 10_000
    llama = ModelPrice(50_000, 50_000)
    assert cost_microdollars(1_000_000, 1_000_000, llama, 700_000) == 70_000


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), max_size=30), st.integers(-5, 100_000))
def test_an_allowance_is_spent_in_order_and_never_bills_more_than_the_cost(usages, allowance):
    allocations = allocate_allowance(usages, allowance)
    assert sum(a.free_tokens for a in allocations) == min(sum(t for t, _ in usages), max(0, allowance))
    for (used, cost), a in zip(usages, allocations, strict=True):
        assert 0 <= a.free_tokens <= used and 0 <= a.billable_microdollars <= cost
        if a.free_tokens == 0:
            assert a.billable_microdollars == cost
    seen_partial = False
    for (used, _), a in zip(usages, allocations, strict=True):
        if seen_partial:
            assert a.free_tokens == 0
        if a.free_tokens < used:
            seen_partial = True


def test_the_version_in_effect_is_the_latest_that_started():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    versions = [(t0, "a"), (t0 + timedelta(days=10), "b")]
    assert effective_at(versions, t0 - timedelta(seconds=1)) is None
    assert effective_at(versions, t0) == "a"
    assert effective_at(versions, t0 + timedelta(days=10)) == "b"


def _record(org: str, at: datetime, model: str = "m1", region: str = "r1") -> UsageRecord:
    return UsageRecord(request_id=str(uuid.uuid4()), occurred_at=at, org_id=org, env_id=str(uuid.uuid4()),
                       key_id=str(uuid.uuid4()), region=region, model=model, endpoint="chat.completions",
                       streamed=False, status_code=200, prompt_tokens=1_000_000, completion_tokens=1_000_000,
                       usage_source="reported", latency_ms=1, node=None)


async def test_a_new_price_applies_from_now_on_and_past_rows_keep_their_cost(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO regions (region_id, display_name, price_multiplier_ppm) "
                           "VALUES ('r1', 'R1', 1100000)")
        await conn.execute("INSERT INTO models (model_id, input_price_microdollars_per_1m, "
                           "output_price_microdollars_per_1m) VALUES ('m1', 100, 200)")
        org = str(await conn.fetchval("INSERT INTO orgs (name) VALUES ('o') RETURNING org_id"))
        before = datetime.now(UTC) - timedelta(minutes=5)
        book = PriceBook()
        assert await write_batch(conn, [_record(org, before)], book) == 1

        await conn.execute("UPDATE models SET input_price_microdollars_per_1m = 1000 WHERE model_id = 'm1'")
        await conn.execute("UPDATE orgs SET discount_ppm = 500000 WHERE org_id = $1", uuid.UUID(org))
        await book.refresh(conn)
        late_old = _record(org, before + timedelta(seconds=1))  # replayed late, but happened before the change
        new = _record(org, datetime.now(UTC) + timedelta(seconds=1))
        assert await write_batch(conn, [late_old, new], book) == 2
        costs = {r["request_id"]: r["cost_microdollars"]
                 for r in await conn.fetch("SELECT request_id, cost_microdollars FROM usage_records")}
        assert costs[late_old.request_id] == 165  # (100 + 200) * 1.1, half off: the old price
        assert costs[new.request_id] == 660  # (1000 + 200) * 1.1, half off
        assert await conn.fetchval("SELECT count(*) FROM price_versions WHERE model_id = 'm1'") == 2
        spend = await conn.fetchrow("SELECT sum(cost_microdollars) AS c, sum(tokens) AS t FROM org_monthly_spend")
        assert (spend["c"], spend["t"]) == (330 + 165 + 660, 6_000_000)
    finally:
        await conn.close()
