"""Pricing maths (pure, property-tested) and prices versioned by effective date in the real ledger."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crosslogic.accounting.ledger import write_batch
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


async def _catalogue(conn: asyncpg.Connection) -> str:
    await conn.execute("INSERT INTO regions (region_id, display_name, price_multiplier_ppm) "
                       "VALUES ('r1', 'R1', 1100000)")
    await conn.execute("INSERT INTO models (model_id, input_price_microdollars_per_1m, "
                       "output_price_microdollars_per_1m) VALUES ('m1', 100, 200)")
    return str(await conn.fetchval("INSERT INTO orgs (name) VALUES ('o') RETURNING org_id"))


async def _costs(conn: asyncpg.Connection) -> dict[str, int]:
    return {r["request_id"]: r["cost_microdollars"]
            for r in await conn.fetch("SELECT request_id, cost_microdollars FROM usage_records")}


async def test_prices_multipliers_and_org_terms_apply_from_their_start_to_rows_however_late(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        org = await _catalogue(conn)
        before = datetime.now(UTC) - timedelta(minutes=5)
        assert (await write_batch(conn, [_record(org, before)])).inserted == 1

        await conn.execute("UPDATE models SET input_price_microdollars_per_1m = 1000 WHERE model_id = 'm1'")
        await conn.execute("UPDATE orgs SET discount_ppm = 500000 WHERE org_id = $1", uuid.UUID(org))
        late_old = _record(org, before + timedelta(seconds=1))  # replayed late, but happened before the changes
        new = _record(org, datetime.now(UTC))
        assert (await write_batch(conn, [late_old, new])).inserted == 2
        costs = await _costs(conn)
        assert costs[late_old.request_id] == 330  # (100 + 200) * 1.1: the old price, no discount yet
        assert costs[new.request_id] == 660  # (1000 + 200) * 1.1, half off
        assert await conn.fetchval("SELECT count(*) FROM price_versions WHERE model_id = 'm1'") == 2
        assert await conn.fetchval("SELECT count(*) FROM org_terms_versions WHERE org_id = $1", uuid.UUID(org)) == 2
        spend = await conn.fetchrow("SELECT sum(cost_microdollars) AS c, sum(tokens) AS t FROM org_monthly_spend")
        assert (spend["c"], spend["t"]) == (330 + 330 + 660, 6_000_000)
    finally:
        await conn.close()


async def test_a_version_never_starts_in_the_past_and_is_never_rewritten(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await _catalogue(conn)
        started = await conn.fetchrow(
            "INSERT INTO price_versions (model_id, effective_from, input_price_microdollars_per_1m, "
            "output_price_microdollars_per_1m) VALUES ('m1', now() - interval '1 hour', 1, 1) "
            "RETURNING effective_from, now() AS transaction_start")
        assert started["effective_from"] >= started["transaction_start"]  # moved to the moment it was recorded
        again = await conn.fetchval(
            "INSERT INTO region_multiplier_versions VALUES ('r1', '-infinity', 5) RETURNING effective_from")
        assert again.year > 2000  # '-infinity' only for the first version of a region
        with pytest.raises(asyncpg.RaiseError):
            await conn.execute("UPDATE price_versions SET input_price_microdollars_per_1m = 0")
    finally:
        await conn.close()


async def test_a_batch_priced_while_a_version_commits_waits_for_it_and_sees_it(database_url):
    """The race of issue 9: a version dated now, rows after it already in a batch. The batch waits for the
    version's transaction (price lock) and is priced with it."""
    changer = await asyncpg.connect(database_url)
    ledger = await asyncpg.connect(database_url)
    try:
        org = await _catalogue(changer)
        change = changer.transaction()
        await change.start()
        await changer.execute("UPDATE regions SET price_multiplier_ppm = 2000000 WHERE region_id = 'r1'")
        after_the_change = _record(org, datetime.now(UTC))  # happened after the version's start
        writing = asyncio.ensure_future(write_batch(ledger, [after_the_change]))
        waiting = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1"
        while await changer.fetchval(waiting, ledger.get_server_pid()) != "Lock":
            assert not writing.done(), "the batch did not wait for the uncommitted version"
            await asyncio.sleep(0.01)
        await change.commit()
        assert (await writing).inserted == 1
        assert (await _costs(changer))[after_the_change.request_id] == 600  # (100 + 200) * 2.0
    finally:
        await changer.close()
        await ledger.close()


async def test_a_row_no_version_prices_is_held_and_written_once_one_exists(database_url):
    from crosslogic.accounting.ledger import held_count, price_held

    conn = await asyncpg.connect(database_url)
    try:
        org = await _catalogue(conn)
        unknown_region = _record(org, datetime.now(UTC), region="r-new")
        unknown_model = _record(org, datetime.now(UTC), model="m-new")
        result = await write_batch(conn, [unknown_region, unknown_model, _record(org, datetime.now(UTC))])
        assert (result.inserted, result.held) == (1, 2)
        assert (await write_batch(conn, [unknown_region])).held == 0  # held once, not twice
        assert await held_count(conn) == 2
        assert dict(await conn.fetch("SELECT request_id, missing FROM usage_unpriced")) == {
            unknown_region.request_id: "region multiplier", unknown_model.request_id: "price"}

        assert (await price_held(conn)).inserted == 0  # still nothing prices them: they stay held
        await conn.execute("INSERT INTO regions (region_id, display_name, price_multiplier_ppm) "
                           "VALUES ('r-new', 'New', 3000000)")
        assert (await price_held(conn)).inserted == 1
        assert await held_count(conn) == 1
        assert (await _costs(conn))[unknown_region.request_id] == 900  # (100 + 200) * 3.0
    finally:
        await conn.close()


@settings(max_examples=60, deadline=None)
@given(tokens, tokens, prices, multipliers, st.integers(1, 2 * PPM), st.integers(0, PPM))
def test_the_ledgers_sql_cost_is_the_python_cost(postgres_server_url, prompt, completion, price, region, tier,
                                                  discount):
    async def sql_cost() -> int:
        conn = await asyncpg.connect(postgres_server_url)
        try:
            await conn.execute(_COST_FUNCTION)
            return await conn.fetchval("SELECT pg_temp.crosslogic_cost($1, $2, $3, $4, $5, $6, $7)", prompt,
                                       completion, price.input_microdollars_per_1m, price.output_microdollars_per_1m,
                                       region, tier, discount)
        finally:
            await conn.close()

    expected = cost_microdollars(prompt, completion, price, region, OrgTerms(tier, discount))
    assert asyncio.run(sql_cost()) == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10**9)), max_size=20), st.integers(0, 50_000),
       st.integers(0, 50_000))
def test_the_ledgers_sql_allowance_is_the_reporters(postgres_server_url, usages, used, allowance):
    async def sql_allocate() -> tuple[int, int]:
        conn = await asyncpg.connect(postgres_server_url)
        try:
            await conn.execute(_ALLOCATE_FUNCTION)
            row = await conn.fetchrow("SELECT * FROM pg_temp.crosslogic_allocate($1, $2, $3, $4)", used, allowance,
                                      [t for t, _ in usages], [c for _, c in usages])
            return row["free_tokens"], row["owed"]
        finally:
            await conn.close()

    allocations = allocate_allowance(usages, allowance - used)
    expected = (sum(a.free_tokens for a in allocations), sum(a.billable_microdollars for a in allocations))
    assert asyncio.run(sql_allocate()) == expected


def _function(name: str) -> str:
    """One function of migration 007, created in pg_temp (the property tests need no migrated database)."""
    from crosslogic.store.db import migration_files

    sql = dict(migration_files())["007_exact_money"]
    start = sql.index(f"CREATE FUNCTION {name}(")
    end = sql.index("$$;", sql.index("$$", sql.index("AS $$", start) + 5)) + 3
    return sql[start:end].replace(f"CREATE FUNCTION {name}(", f"CREATE OR REPLACE FUNCTION pg_temp.{name}(", 1)


_COST_FUNCTION = _function("crosslogic_cost")
_ALLOCATE_FUNCTION = _function("crosslogic_allocate")
