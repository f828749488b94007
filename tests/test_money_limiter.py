"""Bill-cap reservations on a real Valkey (ratelimit/money.py + its scripts) and the ext_authz guard around them:
exactly-once settlement, the cap's bound as a property, Valkey loss, the failure policy."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from crosslogic import errors
from crosslogic.accounting.ledger import MonthlyOwed
from crosslogic.extauthz.billcap import BillCapGuard, Cap, admits, cap_reached
from crosslogic.extauthz.tenants import TenantCache, follow_changes
from crosslogic.keys import hash_api_key
from crosslogic.ratelimit.engine import Limiter, tenant_scope
from crosslogic.ratelimit.limits import LayerLimits, TenantLimits
from crosslogic.ratelimit.money import ENDED, REFUSED, REPEATED, RESERVED, UNKNOWN, MoneyLimiter, money_keys
from crosslogic.runtime.processes import free_port
from crosslogic.store import tenancy
from tests.ratelimit_helpers import wait_for

MONTH = date(2026, 12, 1)


@pytest.fixture
async def redis(valkey_url):
    client = aioredis.from_url(valkey_url)
    yield client
    await client.aclose()


def _org() -> str:
    return str(uuid.uuid4())


async def test_requests_hold_their_cost_while_under_the_cap_and_settle_exactly_once(redis):
    money, org = MoneyLimiter(redis), _org()
    assert (await money.reserve(org, "r1", 600, 1_000, 0, MONTH)).status == RESERVED
    assert (await money.reserve(org, "r1", 600, 1_000, 0, MONTH)).status == REPEATED  # not held twice
    second = await money.reserve(org, "r2", 600, 1_000, 0, MONTH)
    assert (second.status, second.held_microdollars) == (RESERVED, 1_200)  # 600 < 1000: one more may start
    assert (await money.reserve(org, "r3", 1, 1_000, 0, MONTH)).status == REFUSED  # 1200 held >= cap

    # r1's row reached the ledger: owed 450 (its real cost), one reservation released, once.
    settled = [MonthlyOwed(org, MONTH, 450, ("r1",))]
    assert await money.settle_many(settled) == 1
    assert await money.settle_many(settled) == 0  # a replayed batch
    assert await money.settle_many([MonthlyOwed(org, MONTH, 300, ("r1",))]) == 0  # an older, stale read
    keys = money_keys(org, MONTH)
    assert await redis.hmget(keys[0], "c", "h") == [b"450", b"600"]
    assert (await money.reserve(org, "r3", 1, 1_000, 0, MONTH)).status == REFUSED  # 450 owed + 600 held
    assert await money.settle_many([MonthlyOwed(org, MONTH, 900, ("r2",))]) == 1
    assert (await money.reserve(org, "r3", 500, 1_000, 0, MONTH)).status == RESERVED  # 900 < 1000: may start


async def test_a_reservation_for_a_request_that_already_ended_holds_nothing(redis):
    limiter, money, org = Limiter(redis), MoneyLimiter(redis), _org()
    env, key, rid = _org(), _org(), uuid.uuid4().hex
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    assert (await limiter.reserve(org, env, key, rid, 10, limits)).admitted
    assert await limiter.settle(org, env, key, rid, 10)  # the limiter's tombstone for this request id
    assert (await money.reserve(org, rid, 500, 1_000, 0, MONTH)).status == ENDED
    assert await redis.hlen(money_keys(org, MONTH)[1]) == 0
    assert tenant_scope(org, env, key).keys(rid)[0].endswith(rid)


async def test_reservations_whose_rows_never_arrive_expire(redis):
    now = [1_000_000]
    money, org = MoneyLimiter(redis, reservation_ttl_ms=60_000, clock=lambda: now[0]), _org()
    assert (await money.reserve(org, "lost", 900, 1_000, 0, MONTH)).status == RESERVED
    assert (await money.reserve(org, "next", 100, 1_000, 0, MONTH)).status == RESERVED
    assert (await money.reserve(org, "third", 1, 1_000, 0, MONTH)).status == REFUSED
    now[0] += 60_001
    decision = await money.reserve(org, "third", 1, 1_000, 0, MONTH)
    assert (decision.status, decision.held_microdollars) == (RESERVED, 1)


async def test_a_valkey_that_lost_its_data_is_seeded_from_the_ledgers_value(redis):
    money, org = MoneyLimiter(redis), _org()
    assert (await money.reserve(org, "a", 10, 1_000, None, MONTH)).status == UNKNOWN  # nothing known: caller decides
    assert (await money.reserve(org, "a", 10, 1_000, 995, MONTH)).status == RESERVED  # the floor seeds it
    await redis.delete(*money_keys(org, MONTH))  # lost (restart without persistence)
    refused = await money.reserve(org, "b", 10, 1_000, 1_000, MONTH)
    assert (refused.status, refused.owed_microdollars) == (REFUSED, 1_000)
    # The floor only raises: a stale floor never lowers what the ledger settled.
    await money.settle_many([MonthlyOwed(org, MONTH, 1_500, ())])
    assert (await money.reserve(org, "c", 10, 2_000, 1_000, MONTH)).owed_microdollars == 1_500


# ------------------------------------------------------------------------------------------ the bound, as a property

requests = st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 100)), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None)
@given(requests, st.integers(0, 20_000), st.randoms(use_true_random=False))
def test_spend_never_passes_the_cap_by_more_than_one_reservation(valkey_url, wanted, cap, rnd):
    """Any interleaving of admissions, ledger commits and (replayed, out-of-order, stale) settlements."""

    async def run() -> None:
        client = aioredis.from_url(valkey_url)
        try:
            money, org = MoneyLimiter(client), _org()
            owed = 0  # the ledger's truth: what committed rows owe
            reads: list[int] = [0]  # what the ledger read after each commit (pushed late and out of order)
            pending = list(enumerate(wanted))  # (request, (reservation, % of it really spent))
            in_flight: list[tuple[int, int, int]] = []
            committed: dict[int, int] = {}  # request -> index in `reads` of the first read including it
            spent_by_admitted = biggest = 0
            while pending or in_flight or committed:
                move = rnd.randrange(3)
                if move == 0 and pending:
                    i, (reserve, share) = pending.pop(rnd.randrange(len(pending)))
                    floor = rnd.choice(reads)  # ext_authz's last read of the ledger, however old
                    decision = await money.reserve(org, f"r{i}", reserve, cap, floor, MONTH)
                    if decision.status == RESERVED:
                        assert admits(decision.owed_microdollars, decision.held_microdollars - reserve, cap)
                        in_flight.append((i, reserve, reserve * share // 100))
                        biggest = max(biggest, reserve)
                elif move == 1 and in_flight:
                    i, _, actual = in_flight.pop(rnd.randrange(len(in_flight)))
                    owed += actual
                    spent_by_admitted += actual
                    reads.append(owed)
                    committed[i] = len(reads) - 1
                elif committed:
                    batch = rnd.sample(sorted(committed), rnd.randint(1, len(committed)))
                    read = rnd.choice(reads[max(committed[i] for i in batch):])  # after its rows committed
                    await money.settle_many([MonthlyOwed(org, MONTH, read, tuple(f"r{i}" for i in batch))])
                    for i in batch:
                        if rnd.random() < 0.7:  # else replayed later (the backstop, a retried batch)
                            del committed[i]
                c, h = (int(v or 0) for v in await client.hmget(money_keys(org, MONTH)[0], "c", "h"))
                assert c + h >= owed  # Valkey never counts less than the ledger holds
            assert spent_by_admitted == owed
            assert owed < cap + biggest or owed == 0
        finally:
            await client.aclose()

    asyncio.run(run())


def test_the_admission_rule_and_the_after_the_fact_rule():
    assert admits(0, 0, 1) and not admits(0, 0, 0)  # a cap of 0 admits nothing
    assert admits(400, 599, 1_000) and not admits(400, 600, 1_000)
    assert cap_reached(1_000, 1_000) and not cap_reached(999, 1_000)


# ------------------------------------------------------------------------------------------ the ext_authz guard


async def _capped_org(conn: asyncpg.Connection, cap: int | None = 1_000_000, owed: int = 0, **org) -> str:
    """An org (with a cap unless None) owing `owed` this month, and a key: returns the key's hash."""
    await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('r1', 'R1') ON CONFLICT DO NOTHING")
    await conn.execute("INSERT INTO models (model_id, input_price_microdollars_per_1m, "
                       "output_price_microdollars_per_1m) VALUES ('m1', 1000000, 2000000) ON CONFLICT DO NOTHING")
    columns = ", ".join(["name", "monthly_bill_cap_microdollars", *org])
    values = ", ".join(f"${i}" for i in range(1, 3 + len(org)))
    org_id = str(await conn.fetchval(f"INSERT INTO orgs ({columns}) VALUES ({values}) RETURNING org_id",
                                     f"o-{uuid.uuid4().hex[:6]}", cap, *org.values()))
    month = await conn.fetchval("SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date")
    await conn.execute("INSERT INTO org_monthly_spend (org_id, month, owed_microdollars) VALUES ($1, $2, $3)",
                       uuid.UUID(org_id), month, owed)
    env = await tenancy.create_env(conn, org_id, "prod")
    _, plaintext = await tenancy.create_key(conn, SECRET, org_id, env.env_id)
    return hash_api_key(SECRET, plaintext)


SECRET = b"money-secret"


async def _cap(pool: asyncpg.Pool, key_hash: str) -> tuple[str, Cap | None]:
    """The org and cap terms as ext_authz's tenant view reads them."""
    view = await TenantCache(pool).view(key_hash)
    assert view is not None
    return view.org_id, view.cap


@pytest.fixture
async def pool(database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    yield pool
    await pool.close()


async def test_the_tenant_view_carries_the_cap_terms_and_what_is_owed_this_month(pool):
    async with pool.acquire() as conn:
        capped = await _capped_org(conn, cap=5_000, owed=1_234, bill_cap_fail_closed=True)
        uncapped = await _capped_org(conn, cap=None)
    _, cap = await _cap(pool, capped)
    assert cap is not None
    assert (cap.cap_microdollars, cap.owed_microdollars, cap.fail_closed, cap.owes_nothing) == (5_000, 1_234, True,
                                                                                                 False)
    assert cap.month == datetime.now(UTC).date().replace(day=1)
    assert (await _cap(pool, uncapped))[1] is None


async def test_the_guard_reserves_the_maximum_cost_at_the_price_in_effect_after_a_notified_change(
        pool, database_url, redis):
    async with pool.acquire() as conn:
        org, cap = await _cap(pool, await _capped_org(conn))
    guard = BillCapGuard(pool, MoneyLimiter(redis))
    assert await guard.reserve(org, cap, "m1", "r1", "q1", 100, 50)  # 100 * $1 + 50 * $2 per 1M = 200 micro-dollars
    views = TenantCache(pool)
    feed = asyncio.create_task(follow_changes(database_url, views, lambda: None, guard.prices_changed))
    try:
        month = datetime.now(UTC).date().replace(day=1)
        held = money_keys(org, month)[1]
        assert await redis.hget(held, "q1") == b"200"
        await wait_for(_stale(guard), "the change feed listening")  # it marks the book stale once connected
        await guard.reserve(org, cap, "m1", "r1", "q0", 100, 50)  # reloads
        async with pool.acquire() as conn:
            await conn.execute("UPDATE models SET output_price_microdollars_per_1m = 4000000")
        await wait_for(_stale(guard), "the price change notification")
        await guard.reserve(org, cap, "m1", "r1", "q2", 100, 50)
        assert await redis.hget(held, "q2") == b"300"
        await guard.release(org, "q2")  # refused later (rate limit): the money comes back at once
        assert await redis.hget(held, "q2") is None
    finally:
        feed.cancel()


def _stale(guard: BillCapGuard):
    async def stale() -> bool:
        return guard._prices_stale

    return stale


async def test_orgs_that_cannot_owe_anything_or_have_no_cap_cost_no_valkey_call(pool, redis):
    async with pool.acquire() as conn:
        reserved, reserved_cap = await _cap(pool, await _capped_org(conn, cap=0, billing_plan="reserved"))
        uncapped, no_cap = await _cap(pool, await _capped_org(conn, cap=None))
    assert reserved_cap is not None and reserved_cap.owes_nothing and no_cap is None
    guard = BillCapGuard(pool, MoneyLimiter(redis))
    assert not await guard.reserve(reserved, reserved_cap, "m1", "r1", "q", 10, 10)
    assert not await guard.reserve(uncapped, no_cap, "m1", "r1", "q", 10, 10)
    assert [k async for k in redis.scan_iter(match=f"*{reserved}*money*")] == []
    assert [k async for k in redis.scan_iter(match=f"*{uncapped}*money*")] == []


async def test_with_valkey_down_the_cap_falls_back_to_the_ledger_or_refuses_for_fail_closed_orgs(pool):
    async with pool.acquire() as conn:
        under = await _cap(pool, await _capped_org(conn, cap=1_000, owed=999))
        reached = await _cap(pool, await _capped_org(conn, cap=1_000, owed=1_000))
        strict = await _cap(pool, await _capped_org(conn, cap=1_000, owed=0, bill_cap_fail_closed=True))
    down = aioredis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.2)
    try:
        guard = BillCapGuard(pool, MoneyLimiter(down))
        assert not await guard.reserve(*under, "m1", "r1", "q", 10, 10)  # admitted on the ledger's owed
        with pytest.raises(errors.ClientError) as refused:
            await guard.reserve(*reached, "m1", "r1", "q", 10, 10)
        assert (refused.value.status, refused.value.code) == (403, "billing_cap_reached")
        with pytest.raises(errors.ClientError) as unavailable:
            await guard.reserve(*strict, "m1", "r1", "q", 10, 10)
        assert unavailable.value.status == 503
    finally:
        await down.aclose()


async def test_a_model_without_a_price_at_this_moment_is_never_reserved_at_a_guess(pool, redis):
    async with pool.acquire() as conn:
        org, cap = await _cap(pool, await _capped_org(conn))
    guard = BillCapGuard(pool, MoneyLimiter(redis))
    with pytest.raises(errors.ClientError) as refused:
        await guard.reserve(org, cap, "no-such-model", "r1", "q", 10, 10)
    assert refused.value.status == 503
