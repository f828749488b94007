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


def usage_line(request_id: str, prompt: int = 10, completion: int = 5, finished: bool = True,
               start_time: str = "1795810144.134357") -> bytes:
    fields = {
        "request_id": request_id, "start_time": start_time, "status": 200, "duration_ms": 12,
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


async def test_a_line_within_its_grace_waits_for_the_fast_path_and_is_written_when_the_fast_path_missed_it(
        database_url, tmp_path):
    from crosslogic.accounting.recent import RecentIds

    log_path, state = tmp_path / "usage.jsonl", tmp_path / "usage.position"
    logged_at = 1795810144.134357 + 0.012  # start_time + duration_ms of usage_line
    append(log_path, usage_line("g-0"), usage_line("g-1"), usage_line("g-2"))
    committed, settled, now = RecentIds(), [], [logged_at + 0.5]
    committed.add_many(["g-0"])  # the fast path has the first; g-1 and g-2 may still be on their way
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        replayer = BackstopReplayer(UsageLogTailer(log_path, state), pool, settle=settled.append,
                                    committed=committed, grace_s=2.0, clock=lambda: now[0])
        assert await replayer.step() == 1  # g-0 skipped (and its position saved); g-1 is still within its grace
        assert replayer.wait_s == pytest.approx(1.5)
        assert await replayer.step() == 0
        assert (replayer.replayed, settled) == (0, [])
        saved = json.loads(state.read_text())["offset"]
        assert saved == len(usage_line("g-0"))
        committed.add_many(["g-1"])  # the fast path committed g-1 meanwhile; g-2 was lost on the way
        now[0] = logged_at + 2.5
        while await replayer.step():
            pass
        assert (replayer.skipped, replayer.replayed, [r.request_id for r in settled]) == (2, 1, ["g-2"])
        assert json.loads(state.read_text())["offset"] == log_path.stat().st_size
        now[0] = logged_at - 3600  # our clock an hour behind Envoy's: a new line is taken at once, not held
        append(log_path, usage_line("g-3"))
        assert await replayer.step() == 1
        async with pool.acquire() as conn:
            assert await ledger_totals(conn) == (2, 30)
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


class FileLogEnvoy:
    """What Envoy's file access log does with the usage log: appends through the descriptor it opened, so after a
    rename its lines still go to the renamed file, until `POST /reopen_logs` makes it open the configured path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "ab")  # noqa: SIM115 - closed by reopen / close
        self.reopens = 0

    def write(self, *lines: bytes) -> None:
        self.file.write(b"".join(lines))
        self.file.flush()

    def reopen(self) -> None:
        self.file.close()
        self.file = open(self.path, "ab")  # noqa: SIM115
        self.reopens += 1

    def close(self) -> None:
        self.file.close()


async def test_the_log_rotates_under_steady_traffic_and_every_line_lands_once_across_a_restart(
        database_url, tmp_path):
    """Lines keep coming, so the newest are always within their grace (never "fully read"): the log is still
    rotated each time it reaches the threshold, stays bounded, and every request is in the ledger exactly once:
    half by the fast path, the half it lost by the backstop, every line read exactly once, across a restart of
    the backstop while a renamed log was only partly read."""
    from crosslogic.accounting.ledger import LedgerWriter
    from crosslogic.accounting.recent import RecentIds

    log_path, state = tmp_path / "usage.jsonl", tmp_path / "usage.jsonl.position"
    ticks, per_tick, tick_s, grace_s = 40, 20, 0.5, 2.0
    tick_bytes = per_tick * len(usage_line("t-00-00", start_time="1795810144.000000"))
    rotate_bytes = 2 * tick_bytes
    now = [1795810144.0]
    envoy = FileLogEnvoy(log_path)
    committed = RecentIds()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)

    def backstop() -> BackstopReplayer:
        return BackstopReplayer(UsageLogTailer(log_path, state), pool, rotate_bytes=rotate_bytes,
                                reopen=envoy.reopen, committed=committed, grace_s=grace_s, clock=lambda: now[0])

    def fast_path() -> LedgerWriter:  # the gRPC access log's writer, in the same process
        return LedgerWriter(pool, batch_size=1000, flush_interval_s=1, committed=committed)

    replayers, fast = [backstop()], [fast_path()]
    renamed_seen: set[str] = set()
    try:
        for tick in range(ticks):
            ids = [f"t-{tick:02d}-{i:02d}" for i in range(per_tick)]
            # Logged just now (start 0.1 s ago, 12 ms long): within the grace, the line waits for the fast path.
            envoy.write(*(usage_line(rid, start_time=f"{now[0] - 0.1:.6f}") for rid in ids))
            for record in [parse_usage_line(usage_line(rid)) for rid in ids[::2]]:  # the fast path got half
                fast[-1].add(record)
            await fast[-1].flush()
            if tick == ticks // 2:  # the backstop restarts (committed ids forgotten: it redoes the fast path's)
                assert list(tmp_path.glob("usage.jsonl.[0-9]*")), "the restart is meant to find a renamed log"
                replayers[-1].tailer.close()
                committed = RecentIds()
                replayers.append(backstop())
                fast.append(fast_path())
            while await replayers[-1].step():
                pass
            await replayers[-1].rotate()
            renamed = [p.name for p in tmp_path.glob("usage.jsonl.[0-9]*")]
            assert len(renamed) <= 1, renamed  # never a second rotation before the last renamed log is finished
            renamed_seen.update(renamed)
            # Bounded: the threshold plus twice the lines within their grace (the renamed log's last lines wait
            # for theirs while the live log takes the newest), a tick each.
            on_disk = sum(p.stat().st_size for p in tmp_path.glob("usage.jsonl*") if not p.name.endswith("position"))
            assert on_disk <= rotate_bytes + 2 * (grace_s / tick_s + 1) * tick_bytes, (tick, on_disk)
            now[0] += tick_s
        now[0] += grace_s  # the traffic stops; what is left is due
        while await replayers[-1].step():
            pass
        await replayers[-1].rotate()
        renamed_seen.update(p.name for p in tmp_path.glob("usage.jsonl.[0-9]*"))
        while await replayers[-1].step():
            pass
        rotations = sum(r.rotations for r in replayers)
        # One rotation per grace and tick or so (a renamed log is left once its newest line is due): 11 of 40.
        assert rotations >= ticks // (grace_s / tick_s + 1) - 2 and len(renamed_seen) == rotations, rotations
        assert envoy.reopens >= rotations
        total = ticks * per_tick
        assert sum(r.lines_read for r in replayers) == total  # each line read once: none lost, none twice
        assert (sum(f.written for f in fast), sum(r.replayed for r in replayers)) == (total // 2, total // 2)
        async with pool.acquire() as conn:
            assert await ledger_totals(conn) == (total, total * 15)
            ids = {r["request_id"] for r in await conn.fetch("SELECT request_id FROM usage_records")}
        assert ids == {f"t-{t:02d}-{i:02d}" for t in range(ticks) for i in range(per_tick)}
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("usage.jsonl")) == [
            "usage.jsonl", "usage.jsonl.position"]
    finally:
        replayers[-1].tailer.close()
        envoy.close()
        await pool.close()
