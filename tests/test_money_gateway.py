"""Money through the real gateway (`crosslogic up --demo`): prices changing under load are applied exactly at each
row's occurred_at, and a monthly bill cap holds against concurrent clients (issue 9, items 9 and 16)."""

from __future__ import annotations

import asyncio
import bisect
import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import asyncpg
import openai
import redis.asyncio as aioredis

from crosslogic.extauthz import estimate
from crosslogic.ratelimit.money import money_keys, month_of
from crosslogic.store import billing_terms, tenancy
from tests.gateway_helpers import client, ledger_rows
from tests.ratelimit_helpers import wait_for

MODEL = "llama-3-8b"
MESSAGES = [{"role": "user", "content": "what does this cost?"}]
MAX_TOKENS = 16  # the simulator writes exactly max_tokens when asked
TIER = "money-test-1000x"  # the demo's prices are tiny; this makes a request cost thousands of micro-dollars


async def _tenant(gateway: dict, conn: asyncpg.Connection, region: str, **terms) -> dict:
    secret = (Path(gateway["state_dir"]) / "key_secret").read_text().strip().encode()
    await conn.execute("INSERT INTO pricing_tiers VALUES ($1, 1000000000) ON CONFLICT DO NOTHING", TIER)
    org = await tenancy.create_org(conn, "money-" + uuid.uuid4().hex[:8], region_preferences=[region])
    env = await tenancy.create_env(conn, org.org_id, "prod", region=region)
    _, plaintext = await tenancy.create_key(conn, secret, org.org_id, env.env_id, name="k")
    await billing_terms.set_org_terms(conn, str(org.org_id), tier=TIER, **terms)
    return {"org_id": str(org.org_id), "api_key": plaintext}


def _half_up(value: Fraction) -> int:
    return int((value + Fraction(1, 2)).__floor__())


def _expected_cost(prompt: int, completion: int, price: tuple[int, int], region_ppm: int,
                   terms: tuple[int, int]) -> int:
    """Independent of crosslogic.accounting: exact rational arithmetic, one half-up rounding."""
    (input_price, output_price), (tier_ppm, discount_ppm) = price, terms
    exact = (Fraction(prompt * input_price + completion * output_price, 10**6) * Fraction(region_ppm, 10**6)
             * Fraction(tier_ppm, 10**6) * Fraction(10**6 - discount_ppm, 10**6))
    return _half_up(exact)


def _in_effect(versions: list[tuple[datetime, object]], at: datetime) -> object:
    starts = [start for start, _ in versions]
    index = bisect.bisect_right(starts, at) - 1
    assert index >= 0, f"no version in effect at {at}"
    return versions[index][1]


def _start(value: datetime) -> datetime:
    return value if value.tzinfo else datetime.min.replace(tzinfo=UTC)  # -infinity


async def test_prices_multipliers_and_org_terms_changed_under_load_price_every_row_exactly(gateway):
    region = "eu-central"  # pinned there (served by ap-south's nodes through its fallback chain)
    conn = await asyncpg.connect(gateway["database_url"])
    ids: list[str] = []
    stop = asyncio.Event()
    try:
        tenant = await _tenant(gateway, conn, region, discount="0.1")
        org = uuid.UUID(tenant["org_id"])
        api = client(gateway, tenant["api_key"])

        async def load() -> None:
            while not stop.is_set():
                raw = await api.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES,
                                                                          max_tokens=MAX_TOKENS)
                ids.append(raw.headers["x-request-id"])

        async def after_more_requests(n: int = 15) -> None:
            target = len(ids) + n

            async def answered() -> bool:
                return len(ids) >= target

            await wait_for(answered, f"{n} more requests")

        async def started(moment: datetime) -> bool:
            return datetime.now(UTC) > moment

        workers = [asyncio.create_task(load()) for _ in range(6)]
        changes = []
        try:
            await after_more_requests()
            await billing_terms.schedule_price(conn, MODEL, "0.07", "0.11")
            changes.append(datetime.now(UTC))
            await after_more_requests()
            await tenancy.add_region(conn, region, price_multiplier_ppm=1_300_000)
            changes.append(datetime.now(UTC))
            await after_more_requests()
            await billing_terms.set_org_terms(conn, tenant["org_id"], discount="0.25")
            changes.append(datetime.now(UTC))
            await after_more_requests()
            scheduled = datetime.now(UTC) + timedelta(seconds=1)  # recorded ahead: must apply on time
            await billing_terms.schedule_price(conn, MODEL, "0.2", "0.3", scheduled)
            changes.append(scheduled)
            await wait_for(lambda: started(scheduled), "the scheduled price's start")
            await after_more_requests()
        finally:
            stop.set()
            await asyncio.gather(*workers)

        rows = await ledger_rows(gateway["database_url"], ids)
        assert len(rows) == len(ids)
        prices: list[tuple[datetime, object]] = [
            (_start(r["effective_from"]), (r["price_version_id"], (r["input_price_microdollars_per_1m"],
                                                                    r["output_price_microdollars_per_1m"])))
            for r in await conn.fetch("SELECT * FROM price_versions WHERE model_id = $1 ORDER BY effective_from",
                                      MODEL)]
        multipliers = [(_start(r["effective_from"]), r["multiplier_ppm"]) for r in await conn.fetch(
            "SELECT * FROM region_multiplier_versions WHERE region_id = $1 ORDER BY effective_from", region)]
        terms = [(_start(r["effective_from"]), (r["tier_multiplier_ppm"], r["discount_ppm"])) for r in await conn.fetch(
            "SELECT * FROM org_terms_versions WHERE org_id = $1 ORDER BY effective_from", org)]
    finally:
        try:  # the demo's prices again, for the tests after this one
            await billing_terms.schedule_price(conn, MODEL, "0.05", "0.08")
            await tenancy.add_region(conn, region, price_multiplier_ppm=1_000_000)
        finally:
            await conn.close()

    wrong = []
    for request_id, row in rows.items():
        at = row["occurred_at"]
        version_id, price = _in_effect(prices, at)
        expected = _expected_cost(row["prompt_tokens"], row["completion_tokens"], price,
                                  _in_effect(multipliers, at), _in_effect(terms, at))
        if (row["cost_microdollars"], row["price_version_id"]) != (expected, version_id):
            wrong.append((request_id, at, row["cost_microdollars"], expected))
    assert wrong == [], f"{len(wrong)} of {len(rows)} rows not priced at the versions in effect: {wrong[:5]}"
    for change in changes:  # the load really straddled every change
        assert any(r["occurred_at"] < change for r in rows.values())
        assert any(r["occurred_at"] >= change for r in rows.values())
    assert len({r["cost_microdollars"] for r in rows.values()}) >= 5


async def test_a_bill_cap_holds_against_concurrent_clients_within_one_reservation(gateway):
    conn = await asyncpg.connect(gateway["database_url"])
    redis = aioredis.from_url(gateway["redis_url"])
    try:
        # 2,000 micro-dollars of free tier is about 8 requests; the cap counts what is owed after it.
        tenant = await _tenant(gateway, conn, "ap-south", free_tokens=400, cap_usd="0.05")
        org = uuid.UUID(tenant["org_id"])
        cap = 50_000
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        price, terms = (50_000, 80_000), (1_000_000_000, 0)
        reservation = _expected_cost(estimate.chat_prompt_tokens(MESSAGES, body), MAX_TOKENS, price, 1_000_000, terms)
        api = client(gateway, tenant["api_key"])
        admitted: list[str] = []
        refused = 0

        async def one() -> bool:
            nonlocal refused
            try:
                raw = await api.chat.completions.with_raw_response.create(**body)
            except openai.PermissionDeniedError as exc:
                assert exc.body["code"] == "billing_cap_reached" and exc.body["type"] == "insufficient_quota"
                refused += 1
                return False
            admitted.append(raw.headers["x-request-id"])
            return True

        async def client_loop() -> None:
            while await one():
                pass

        await asyncio.gather(*(client_loop() for _ in range(12)))  # until each client is refused once
        month = month_of(datetime.now(UTC))
        money, held, _ = money_keys(tenant["org_id"], month)

        async def settled() -> bool:  # every reservation released (all rows in the ledger)
            return int(await redis.hget(money, "h") or 0) == 0 and await redis.hlen(held) == 0

        # One at a time until refused with nothing in flight: then what is owed has reached the cap.
        while True:
            await wait_for(settled, "every bill-cap reservation settled")
            if not await one():
                break
        await wait_for(settled, "every bill-cap reservation settled")

        rows = await ledger_rows(gateway["database_url"], admitted)
        assert len(rows) == len(admitted) and refused >= 12
        spend = await conn.fetchrow("SELECT * FROM org_monthly_spend WHERE org_id = $1 AND month = $2", org, month)
        gross = sum(r["cost_microdollars"] for r in rows.values())
        assert spend["cost_microdollars"] == gross
        # Every request generated the same tokens at the same price: the free tier's share is order-free.
        usage = sorted((r["total_tokens"], r["cost_microdollars"]) for r in rows.values())
        assert len(set(usage)) == 1
        tokens, cost = usage[0]
        free_left, owed = 400, 0
        for _ in usage:
            free = min(tokens, free_left)
            free_left -= free
            owed += _half_up(Fraction(cost * (tokens - free), tokens))
        assert spend["owed_microdollars"] == owed and spend["free_tokens"] == 400
        assert int(await redis.hget(money, "c")) == owed  # Valkey's month agrees with the ledger
        # Never past the cap by more than one reservation; refused only once the cap was reached.
        assert cap <= owed < cap + reservation, (owed, cap, reservation)
        assert cost <= reservation
    finally:
        await conn.close()
        await redis.aclose()
