"""The durable usage backstop: Envoy's JSON-lines log replayed into the real ledger, exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crosslogic.accounting.backstop import BackstopReplayer, UsageLogTailer, parse_usage_line
from crosslogic.runtime.processes import free_port
from tests.billing_helpers import priced_catalogue

ORG, ENV, KEY = (str(uuid.uuid4()) for _ in range(3))


@pytest.fixture
def database_url(database_url: str) -> str:
    """The database with the model, region and org the usage lines name (else their rows would be held)."""

    async def seed() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await priced_catalogue(conn, [ORG])
        finally:
            await conn.close()

    asyncio.run(seed())
    return database_url


def usage_line(request_id: str, prompt: int = 10, completion: int = 5, finished: bool = True) -> bytes:
    fields = {
        "request_id": request_id, "start_time": "1795810144.134357", "status": 200, "duration_ms": 12,
        "upstream": "127.0.0.1:9000",
        "authz": {"org_id": ORG, "env_id": ENV, "key_id": KEY, "model": "llama-3-8b", "region": "ap-south",
                  "endpoint": "chat.completions", "streamed": True},
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "finished": finished, "mode": "sse-keep"},
    }
    return json.dumps(fields).encode() + b"\n"


def append(path: Path, *lines: bytes) -> None:
    with open(path, "ab") as f:
        for line in lines:
            f.write(line)


async def ledger_totals(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow("SELECT count(*) AS n, coalesce(sum(total_tokens), 0) AS t FROM usage_records")
    return row["n"], row["t"]


def test_a_usage_line_becomes_the_same_record_the_grpc_log_would_give():
    record = parse_usage_line(usage_line("r-1", 17, 7, finished=False))
    assert record is not None
    assert (record.request_id, record.prompt_tokens, record.completion_tokens) == ("r-1", 17, 7)
    assert record.usage_source == "partial" and record.streamed and record.node == "127.0.0.1:9000"
    assert record.occurred_at.timestamp() == pytest.approx(1795810144.134357)


def test_unauthorised_or_garbled_lines_bill_nothing():
    assert parse_usage_line(b"{not json") is None
    assert parse_usage_line(json.dumps({"request_id": "x", "authz": None, "usage": None}).encode()) is None


@given(cut=st.integers(min_value=1), sort_keys=st.booleans())
def test_a_record_appended_after_a_torn_line_is_still_read(cut, sort_keys):
    """Envoy killed mid-write leaves half a line; the restarted Envoy's first record lands right after it."""
    torn = usage_line("torn", 3, 3)[:-1]
    torn = torn[: 1 + cut % (len(torn) - 1)]
    intact = json.loads(usage_line("intact", 21, 8))
    record = parse_usage_line(torn + json.dumps(intact, sort_keys=sort_keys).encode())
    assert record is not None
    assert (record.request_id, record.prompt_tokens, record.completion_tokens) == ("intact", 21, 8)


async def test_replay_writes_every_line_once_and_a_restart_resumes_from_the_saved_position(database_url, tmp_path):
    log_path, state = tmp_path / "usage.jsonl", tmp_path / "usage.position"
    append(log_path, *(usage_line(f"r-{i}") for i in range(50)))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        replayer = BackstopReplayer(UsageLogTailer(log_path, state), pool)
        while await replayer.step():
            pass
        assert replayer.replayed == 50
        # A half-written line is left for later, never parsed.
        append(log_path, usage_line("r-50")[:40])
        assert await replayer.step() == 0
        append(log_path, usage_line("r-50")[40:])
        replayer.tailer.close()

        again = BackstopReplayer(UsageLogTailer(log_path, state), pool)
        while await again.step():
            pass
        assert (again.lines_read, again.replayed) == (1, 1)
        async with pool.acquire() as conn:
            assert await ledger_totals(conn) == (51, 51 * 15)
    finally:
        await pool.close()


async def test_rows_the_fast_path_already_wrote_are_not_written_twice(database_url, tmp_path):
    log_path = tmp_path / "usage.jsonl"
    append(log_path, *(usage_line(f"r-{i}") for i in range(10)))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        first = BackstopReplayer(UsageLogTailer(log_path, tmp_path / "a.position"), pool)
        second = BackstopReplayer(UsageLogTailer(log_path, tmp_path / "b.position"), pool)
        while await first.step():
            pass
        while await second.step():
            pass
        assert (first.replayed, second.replayed, second.lines_read) == (10, 0, 10)
        async with pool.acquire() as conn:
            assert await ledger_totals(conn) == (10, 150)
    finally:
        await pool.close()


async def test_lines_the_fast_path_committed_are_skipped_and_the_rest_written_and_settled(database_url, tmp_path):
    from crosslogic.accounting.ledger import LedgerWriter, write_batch
    from crosslogic.accounting.recent import RecentIds

    log_path = tmp_path / "usage.jsonl"
    append(log_path, *(usage_line(f"s-{i}") for i in range(10)))
    committed, settled = RecentIds(), []
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        # The gRPC fast path got (and committed) requests 0-5; entries 6-9 were lost on the way.
        fast = LedgerWriter(pool, batch_size=100, flush_interval_s=1, committed=committed)
        for record in [parse_usage_line(usage_line(f"s-{i}")) for i in range(6)]:
            fast.add(record)
        await fast.flush()
        replayer = BackstopReplayer(UsageLogTailer(log_path, tmp_path / "p.position"), pool,
                                    settle=settled.append, committed=committed)
        while await replayer.step():
            pass
        assert (replayer.skipped, replayer.replayed) == (6, 4)
        assert sorted(r.request_id for r in settled) == [f"s-{i}" for i in range(6, 10)]
        async with pool.acquire() as conn:
            assert await ledger_totals(conn) == (10, 150)
            assert (await write_batch(conn, [parse_usage_line(usage_line("s-0"))])).inserted == 0
    finally:
        await pool.close()


def test_recent_ids_forget_the_oldest_beyond_their_capacity():
    from crosslogic.accounting.recent import RecentIds

    recent = RecentIds(capacity=3)
    recent.add_many(["a", "b", "c", "d"])
    assert ("a" in recent, "d" in recent, len(recent)) == (False, True, 3)


async def test_a_rotated_log_is_finished_before_the_new_one_even_across_a_restart(database_url, tmp_path):
    log_path, state = tmp_path / "usage.jsonl", tmp_path / "usage.position"
    append(log_path, *(usage_line(f"a-{i}") for i in range(5)))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        replayer = BackstopReplayer(UsageLogTailer(log_path, state), pool)
        await replayer.step()
        # More lines land in the old file, then it is renamed away and Envoy starts a new one.
        append(log_path, *(usage_line(f"b-{i}") for i in range(3)))
        os.rename(log_path, tmp_path / "usage.jsonl.1")
        append(log_path, *(usage_line(f"c-{i}") for i in range(4)))
        replayer.tailer.close()

        resumed = BackstopReplayer(UsageLogTailer(log_path, state), pool)
        while await resumed.step():
            pass
        assert resumed.lines_read == 7
        async with pool.acquire() as conn:
            assert await ledger_totals(conn) == (12, 12 * 15)
    finally:
        await pool.close()


async def test_usage_stays_spooled_while_postgres_is_unreachable_and_lands_when_it_returns(database_url, tmp_path):
    log_path, state = tmp_path / "usage.jsonl", tmp_path / "usage.position"
    append(log_path, *(usage_line(f"r-{i}") for i in range(20)))
    down = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", min_size=0)
    tailer = UsageLogTailer(log_path, state)
    replayer = BackstopReplayer(tailer, down)
    with pytest.raises(OSError):
        await replayer.step()
    assert not state.exists() and tailer.position.offset == 0
    await down.close()

    # The process may even die meanwhile: a new one starts from the last committed position (none).
    tailer.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        back = BackstopReplayer(UsageLogTailer(log_path, state), pool)
        while await back.step():
            pass
        assert back.replayed == 20
    finally:
        await pool.close()


async def test_a_large_log_is_rotated_once_replayed_and_the_finished_file_removed(database_url, tmp_path):
    log_path, state = tmp_path / "usage.jsonl", tmp_path / "usage.position"
    append(log_path, *(usage_line(f"a-{i}") for i in range(30)))
    reopened = []

    def envoy_reopens() -> None:  # what Envoy does on POST /reopen_logs: a new file at the configured path
        reopened.append(True)
        append(log_path, *(usage_line(f"b-{i}") for i in range(5)))

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        replayer = BackstopReplayer(UsageLogTailer(log_path, state), pool, rotate_bytes=1000, reopen=envoy_reopens)
        await replayer.rotate()
        assert not reopened  # not read yet: never rotated away unread
        while await replayer.step():
            pass
        await replayer.rotate()
        assert reopened and replayer.rotations == 1
        while await replayer.step():
            pass
        assert replayer.replayed == 35
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("usage.jsonl")) == ["usage.jsonl"]
    finally:
        await pool.close()
