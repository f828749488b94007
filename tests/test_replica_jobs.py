"""Work that happens once per fleet stays correct with N replicas running it (`crosslogic up --replicas N`):
the usage-log backstop (one holder, a standby takes over), the rotation with several Envoys writing the log,
the billing reporter (two at once bill each export once)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from crosslogic.accounting import backstop
from crosslogic.accounting.backstop import BackstopReplayer, UsageLogTailer, run_exclusively
from tests.billing_helpers import local_stripe
from tests.test_backstop import append, database_url, ledger_totals, usage_line  # noqa: F401 (fixture)
from tests.test_billing_reporter import _org, _reporter, _stripe_total, _usage


async def _until(check, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_one_accounting_replica_replays_the_usage_log_and_a_standby_takes_over_when_it_dies(
        database_url, tmp_path):  # noqa: F811 (the fixture)
    log_path = tmp_path / "usage.jsonl"
    append(log_path, *(usage_line(f"a-{i}") for i in range(5)))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    replayers = [BackstopReplayer(UsageLogTailer(log_path, tmp_path / "usage.jsonl.position"), pool)
                 for _ in range(2)]
    lock = tmp_path / "usage.jsonl.lock"
    tasks = [asyncio.create_task(run_exclusively(r, lock, retry_s=0.02)) for r in replayers]
    try:
        async with pool.acquire() as conn:
            async def replayed(n: int) -> bool:
                return (await ledger_totals(conn))[0] == n
            # Wait on the replayers, not the ledger: a replayer counts its lines once their position is
            # committed, after the rows (an fsync later; under load the ledger showed 5 rows while both
            # counters still read 0). The takeover below also needs that position committed.
            await _until(lambda: asyncio.sleep(0, sum(r.lines_read for r in replayers) >= 5))
            assert await replayed(5)
            holder, standby = sorted(range(2), key=lambda i: -replayers[i].lines_read)
            assert (replayers[holder].lines_read, replayers[standby].lines_read) == (5, 0)
            tasks[holder].cancel()  # the holder dies: its lock goes with it
            await asyncio.gather(tasks[holder], return_exceptions=True)
            append(log_path, *(usage_line(f"b-{i}") for i in range(3)))
            await _until(lambda: asyncio.sleep(0, replayers[standby].lines_read >= 3))
            assert await replayed(8)
            # The standby resumed at the holder's committed position: nothing read twice.
            assert replayers[standby].lines_read == 3 and replayers[standby].replayed == 3
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in replayers:
            r.tailer.close()
        await pool.close()


async def test_a_rotated_log_is_kept_and_read_until_every_envoy_reopened_its_log(
        database_url, tmp_path, monkeypatch):  # noqa: F811 (the fixture)
    monkeypatch.setattr(backstop, "REOPEN_GRACE_S", 0.0)
    log_path = tmp_path / "usage.jsonl"
    append(log_path, *(usage_line(f"a-{i}") for i in range(3)))
    reopened: list[bool] = []
    second_envoy_up = False

    def reopen() -> None:  # two Envoys write the log; the second is down (restarting) at first
        reopened.append(second_envoy_up)
        if not second_envoy_up:
            raise ConnectionRefusedError("envoy-2 admin")

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    replayer = BackstopReplayer(UsageLogTailer(log_path, tmp_path / "usage.jsonl.position"), pool,
                                rotate_bytes=1, reopen=reopen)
    try:
        while await replayer.step():
            pass
        await replayer.rotate()  # renamed away; the reopen failed for envoy-2
        (renamed,) = tmp_path.glob("usage.jsonl.[0-9]*")
        append(log_path, usage_line("new-1"))  # envoy-1 reopened: the new file exists
        append(renamed, usage_line("late-1"))  # envoy-2 still appends to the renamed file
        while await replayer.step():
            pass
        assert renamed.exists(), "left while an Envoy still writes it"
        second_envoy_up = True
        await replayer.rotate()  # retried: now every Envoy reopened
        while await replayer.step():
            pass
        assert not renamed.exists() and reopened == [False, True]
        async with pool.acquire() as conn:
            ids = {r["request_id"] for r in await conn.fetch("SELECT request_id FROM usage_records")}
        assert ids == {"a-0", "a-1", "a-2", "late-1", "new-1"}
    finally:
        replayer.tailer.close()
        await pool.close()


async def test_a_renamed_log_found_at_the_start_is_kept_until_every_envoy_was_asked_to_reopen_again(
        database_url, tmp_path, monkeypatch):  # noqa: F811 (the fixture)
    """The last holder died between its rename and envoy-2's reopen: the standby resumes in the renamed log, and
    must not leave (and delete) it on reaching its end while envoy-2 may still append to it."""
    monkeypatch.setattr(backstop, "REOPEN_GRACE_S", 0.0)
    log_path, state = tmp_path / "usage.jsonl", tmp_path / "usage.jsonl.position"
    append(log_path, *(usage_line(f"a-{i}") for i in range(3)))
    dead = UsageLogTailer(log_path, state)
    dead.read_lines()
    dead.commit(dead.unread_from(1))  # it had committed a-0, then renamed the log and died
    dead.close()
    renamed = tmp_path / "usage.jsonl.1"
    log_path.rename(renamed)
    append(log_path, usage_line("new-1"))  # envoy-1 reopened; envoy-2 had not
    reopens: list[int] = []
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    standby = BackstopReplayer(UsageLogTailer(log_path, state), pool, rotate_bytes=1 << 20,
                               reopen=lambda: reopens.append(1))
    try:
        while await standby.step():
            pass
        assert renamed.exists() and standby.lines_read == 2  # a-1, a-2: resumed after a-0, kept the file
        append(renamed, usage_line("late-1"))  # envoy-2, still on the renamed file
        await standby.rotate()  # asks every Envoy to reopen (no rotation of its own)
        while await standby.step():
            pass
        assert reopens == [1] and standby.rotations == 0 and not renamed.exists()
        async with pool.acquire() as conn:
            ids = {r["request_id"] for r in await conn.fetch("SELECT request_id FROM usage_records")}
        assert ids == {"a-1", "a-2", "late-1", "new-1"}  # a-0 was the dead holder's to write
    finally:
        standby.tailer.close()
        await pool.close()


@pytest.fixture
async def pool(database_url):  # noqa: F811 (the fixture)
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=6)
    yield pool
    await pool.close()


async def test_two_billing_reporters_at_once_bill_every_export_exactly_once(pool):
    async with pool.acquire() as conn:
        orgs = [await _org(conn, free=300) for _ in range(3)]
        for org in orgs:
            await _usage(conn, org, 15)
    async with local_stripe() as (fake, base):
        first, second = _reporter(pool, base), _reporter(pool, base)
        results = await asyncio.gather(*(r.run_once() for _ in range(3) for r in (first, second)))
        assert sum(r.failed for r in results) == 0
        async with pool.acquire() as conn:
            exports = await conn.fetch("SELECT identifier, status FROM billing_exports")
            assert exports and {e["status"] for e in exports} == {"sent"}
            assert await conn.fetchval("SELECT bool_and(billed) FROM usage_records")
            for org in orgs:
                customer, billable = await conn.fetchrow(
                    "SELECT o.stripe_customer_id, sum(u.billable_microdollars) FROM usage_records u "
                    "JOIN orgs o USING (org_id) WHERE org_id = $1 GROUP BY 1", uuid.UUID(org))
                assert await _stripe_total(fake, customer) == billable
        identifiers = [e["identifier"] for e in fake.events]
        assert sorted(identifiers) == sorted(e["identifier"] for e in exports)

