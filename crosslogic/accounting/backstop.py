"""The durable backstop: replay Envoy's JSON-lines usage log into the ledger, idempotently by request id.

Envoy's gRPC access log is the fast path but drops entries while the sink is away (DESIGN.md §4). Envoy
also appends every authorised request to a local file (same fields, written at log time, so the usage
values are as final as the ALS's). This tailer reads that file from a persisted position, writes batches
with the ledger's `ON CONFLICT (request_id) DO NOTHING`, and only then moves the position on: the file is
the on-disk spool, so a Postgres outage or a crash of this process loses nothing; it only delays.

Rotation: rename the file (e.g. `usage.jsonl` -> `usage.jsonl.<n>`), then ask Envoy to reopen its logs
(admin `POST /reopen_logs`). The tailer finishes the renamed file through its open descriptor, then moves
to the new one; after a restart it finds the renamed file again by inode. A truncated file restarts at 0.
The replayer renames the file it reads once it is past the size threshold, read to its end or not (under
steady traffic the newest lines are always within their grace, so "fully read" never comes): the renamed
file is still the spool, only read to its end and removed once every Envoy writes the new one. So there is at
most one renamed file at a time, and the log is bounded by about twice the threshold plus what is unread.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from crosslogic.accounting import metrics
from crosslogic.accounting.ledger import OwedHook, write_batch
from crosslogic.accounting.recent import RecentIds
from crosslogic.accounting.usage import UsageRecord, record_from_fields

log = logging.getLogger("crosslogic.accounting.backstop")
READ_CHUNK_BYTES = 1 << 20
POLL_INTERVAL_S = 0.2
REOPEN_GRACE_S = 1.0


def _as_dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _start_time(value: object) -> datetime:
    """Envoy's `%START_TIME(%s.%6f)%`: epoch seconds and microseconds, parsed without floats."""
    text = str(value)
    seconds, _, micros = text.partition(".")
    try:
        return datetime.fromtimestamp(int(seconds), UTC).replace(microsecond=int((micros or "0")[:6].ljust(6, "0")))
    except ValueError:
        return datetime.now(UTC)


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _glued_record(line: bytes) -> object:
    """The whole record at the end of a line that starts with the torn remains of another.

    Envoy killed in the middle of a write leaves a line without its newline; the restarted Envoy appends its
    first record right after it. Reading that line as a whole would lose the intact record too, so try every
    later `{"` as a record start: only a complete object reaching the end of the line parses."""
    start = line.find(b'{"', 1)
    while start > 0:
        try:
            fields = json.loads(line[start:])
        except ValueError:
            fields = None
        if isinstance(fields, dict) and "request_id" in fields:
            return fields
        start = line.find(b'{"', start + 1)
    return None


def parse_usage_line(line: bytes) -> UsageRecord | None:
    """One JSON line (format: crosslogic.contract.USAGE_LOG_FORMAT) -> a record; None if not billable."""
    try:
        fields = json.loads(line)
    except ValueError:
        fields = _glued_record(line)
        log.error("torn usage log line (Envoy killed mid-write?): %s: %.200r",
                  "kept the intact record after it" if fields is not None else "skipped", line)
        if fields is None:
            return None
    return parse_usage_fields(fields)


def parse_usage_fields(fields: object) -> UsageRecord | None:
    """The usage log's fields, however they were carried (a JSON line; a fluentd record in
    bench/access_log_paths.py) -> a record; None if not billable."""
    if not isinstance(fields, dict):
        return None
    upstream = fields.get("upstream")
    return record_from_fields(
        request_id=str(fields.get("request_id") or ""),
        occurred_at=_start_time(fields.get("start_time")),
        authz=_as_dict(fields.get("authz")), usage=_as_dict(fields.get("usage")),
        status_code=_int(fields.get("status")), latency_ms=_int(fields.get("duration_ms")),
        node=upstream if isinstance(upstream, str) and upstream not in ("", "-") else None,
    )


class _Head(msgspec.Struct):
    """What the backstop needs of a line before deciding to parse it whole (msgspec skips the rest)."""

    request_id: Any = None
    start_time: Any = None
    duration_ms: Any = None


_decode_head = msgspec.json.Decoder(_Head).decode


def _logged_at(head: _Head) -> float:
    """When Envoy logged the line (start + duration), epoch seconds; 0 when unreadable (counts as old)."""
    try:
        return float(head.start_time) + float(head.duration_ms or 0) / 1000
    except (TypeError, ValueError):
        return 0.0


@dataclass(frozen=True)
class Position:
    inode: int
    offset: int


class UsageLogTailer:
    """Reads whole lines from the usage log, following renames; the position is committed by the caller."""

    def __init__(self, path: Path, state_path: Path) -> None:
        self.path = path
        self.state_path = state_path
        self._file = None
        self._inode = 0
        self._offset = 0
        self._read_start = 0
        self.line_ends: list[int] = []  # end offset of each line the last read_lines returned
        self._opened = False
        # False while a rotation waits for every Envoy to reopen its log: an Envoy that has not reopened yet
        # still appends to the renamed file, so the tailer must not leave (and delete) it.
        self.may_leave_renamed: Callable[[], bool] = lambda: True

    def _load_position(self) -> Position | None:
        try:
            data = json.loads(self.state_path.read_text())
            return Position(int(data["inode"]), int(data["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _find_by_inode(self, inode: int) -> Path | None:
        # Rotated copies are `<name>.<digits>` (never the .position / .tmp files beside them).
        candidates = [self.path, *sorted(self.path.parent.glob(self.path.name + ".[0-9]*"))]
        for candidate in candidates:
            try:
                if candidate.stat().st_ino == inode:
                    return candidate
            except OSError:
                continue
        return None

    def _open(self, path: Path, offset: int) -> bool:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - held across reads, closed in _close
        except OSError:
            return False
        self._close()
        self._file = handle
        self._inode = os.fstat(handle.fileno()).st_ino
        size = os.fstat(handle.fileno()).st_size
        self._offset = offset if offset <= size else 0  # truncated under us: start again
        handle.seek(self._offset)
        return True

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _ensure_open(self) -> bool:
        if self._file is not None:
            return True
        if not self._opened:
            self._opened = True
            saved = self._load_position()
            if saved is not None:
                found = self._find_by_inode(saved.inode)
                if found is not None:
                    return self._open(found, saved.offset)
        return self._open(self.path, 0)

    def _path_inode(self) -> int | None:
        try:
            return self.path.stat().st_ino
        except OSError:
            return None

    def read_lines(self, max_bytes: int = READ_CHUNK_BYTES) -> tuple[list[bytes], Position]:
        """Complete lines after the current position (never a half-written one) and the position after them."""
        if not self._ensure_open():
            return [], Position(0, 0)
        assert self._file is not None
        if os.fstat(self._file.fileno()).st_size < self._offset:  # copy-truncated
            self._offset = 0
        self._read_start = self._offset
        self._file.seek(self._offset)
        data = self._file.read(max_bytes)
        end = data.rfind(b"\n")
        if end < 0:
            current = self._path_inode()
            if not data and current is not None and current != self._inode and self.may_leave_renamed():
                # Renamed away and fully read (everything before was committed): continue with the file
                # Envoy now writes, and drop the old one.
                finished = self._find_by_inode(self._inode)
                self._open(self.path, 0)
                # Saved before the unlink, so a reused inode number can never resume at the old offset.
                self.commit(self.position)
                if finished is not None and finished != self.path:
                    finished.unlink(missing_ok=True)
                return self.read_lines(max_bytes)
            return [], Position(self._inode, self._offset)
        lines, ends, start = [], [], 0
        while start <= end:
            stop = data.index(b"\n", start)
            if data[start:stop].strip():
                lines.append(data[start:stop])
                ends.append(self._offset + stop + 1)
            start = stop + 1
        self.line_ends = ends
        self._offset += end + 1
        return lines, Position(self._inode, self._offset)

    def unread_from(self, index: int) -> Position:
        """Give back the lines of the last read_lines from `index` on (read again next time); the position
        after the lines kept."""
        self._offset = self.line_ends[index - 1] if index else self._read_start
        return Position(self._inode, self._offset)

    @property
    def position(self) -> Position:
        return Position(self._inode, self._offset)

    def rotate_if_large(self, max_bytes: int) -> bool:
        """Rename the live log away once it is `max_bytes` or more, read to its end or not (the caller then has
        Envoy reopen its logs). Only the file being read is renamed: never a second one before the tailer has
        finished and left the last. Call it only with every line read so far committed (or given back)."""
        if self._file is None or self._path_inode() != self._inode:
            return False
        if os.fstat(self._file.fileno()).st_size < max_bytes:
            return False
        # The renamed file is found again only by the saved inode: make sure it is saved before the rename.
        self.commit(self.position)
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{time.time_ns()}"))
        return True

    def backlog_bytes(self) -> int:
        try:
            return max(0, os.fstat(self._file.fileno()).st_size - self._offset) if self._file else 0
        except OSError:
            return 0

    def commit(self, position: Position) -> None:
        """Persist the position durably (after the ledger committed everything before it)."""
        tmp = self.state_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"inode": position.inode, "offset": position.offset}))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.state_path)

    def rewind(self) -> None:
        """Undo the last read_lines (the ledger did not take those lines): they are read again next time."""
        self._offset = self._read_start

    def close(self) -> None:
        self._close()


class BackstopReplayer:
    """Owns the tail -> ledger loop. `replayed` counts rows it inserted (the fast path had missed them)."""

    def __init__(self, tailer: UsageLogTailer, pool: asyncpg.Pool, rotate_bytes: int = 0,
                 reopen: Callable[[], None] | None = None, settle: Callable[[UsageRecord], None] | None = None,
                 committed: RecentIds | None = None, on_owed: OwedHook | None = None, grace_s: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.tailer = tailer
        # How long a line is left for the fast path to commit before the backstop takes it on (0: at once).
        # Without it the tail (polled every 0.2 s) usually reads a line before the gRPC entry reached the
        # ledger, and both paths did the whole work: measured, half the accounting service's CPU. The line
        # stays unread (its position uncommitted) meanwhile, so waiting can delay but never lose it.
        self.grace_s = grace_s
        self.clock = clock
        self.wait_s = 0.0  # until the oldest line left unread is due (run's next sleep)
        # Ids the gRPC fast path already wrote to the ledger (and settled): their lines are skipped, which
        # halves the accounting work per request when nothing was lost. A miss only costs the full work.
        self.committed = committed
        self.skipped = 0
        # Rate-limit settlement (idempotent per request id): a request whose gRPC entry was lost would
        # otherwise keep its reservation and concurrency lease until they expire.
        self.settle = settle
        self.rotate_bytes = rotate_bytes
        self.reopen = reopen
        self.rotations = 0
        self.pool = pool
        self.on_owed = on_owed  # bill-cap settlement, once the rows are in the ledger
        self.replayed = 0
        self.lines_read = 0
        # Since when every Envoy has reopened its log after our last rotation (None: not yet). At the start it
        # is not known: the last holder of the log (this process before a restart, or another replica) may have
        # died between a rename and every Envoy's reopen, so a renamed log found then is left only after every
        # Envoy was asked again. Without `reopen` nothing can be asked: such a log is left once read.
        self._reopened_at: float | None = float("-inf") if reopen is None else None
        tailer.may_leave_renamed = self._renamed_file_finished

    def _renamed_file_finished(self) -> bool:
        # One Envoy: the new file exists only once it reopened (after flushing the old one), which the tailer
        # sees. Several: the first one's new file says nothing of the others, which reopen on their flush
        # thread after the admin call returned: a second of grace for the lines they still had for the old file.
        grace = REOPEN_GRACE_S if getattr(self.reopen, "targets", 1) > 1 else 0.0
        return self._reopened_at is not None and time.monotonic() - self._reopened_at >= grace

    async def step(self) -> int:
        """One batch: read, write, commit. Returns the number of lines consumed (0 = caught up)."""
        before = self.tailer.position
        lines, position = self.tailer.read_lines()
        skipped = 0
        if lines and self.committed is not None:
            lines, position, skipped = self._due(lines, position)
        if not lines:
            if position.inode and position != before:
                await asyncio.to_thread(self.tailer.commit, position)
            self.lines_read += skipped
            return skipped
        records = [r for r in map(parse_usage_line, lines) if r is not None]
        if self.settle is not None:  # Redis, not Postgres: settle even while the ledger is away
            for record in records:
                self.settle(record)
        try:
            inserted = 0
            if records:
                async with self.pool.acquire() as conn:
                    result = await write_batch(conn, records, "backstop")
                inserted = result.inserted
                if result.owed and self.on_owed is not None:
                    self.on_owed(result.owed)
        except BaseException:
            self.tailer.rewind()
            raise
        # fsync off the event loop (it took ~10% of the service's samples there on a busy disk)
        await asyncio.to_thread(self.tailer.commit, position)
        self.replayed += inserted
        self.lines_read += len(lines) + skipped
        metrics.backstop_replays.inc(inserted)
        metrics.ledger_lag.set(self.tailer.backlog_bytes())
        metrics.ledger_rows.labels("backstop").inc(inserted)
        return len(lines) + skipped

    def _due(self, lines: list[bytes], position: Position) -> tuple[list[bytes], Position, int]:
        """(the lines to take on now, the position after them, how many were skipped): lines the fast path
        committed are skipped unparsed; the first line still within its grace is given back to the tailer
        with all after it."""
        assert self.committed is not None
        due, skipped, now = [], 0, self.clock()
        self.wait_s = 0.0
        for index, line in enumerate(lines):
            try:
                head = _decode_head(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                due.append(line)  # parse_usage_line reports it
                continue
            if isinstance(head.request_id, str) and head.request_id in self.committed:
                skipped += 1
                continue
            wait = _logged_at(head) + self.grace_s - now
            # (a line stamped in the future, Envoy's clock ahead of ours, is taken at once: waiting on it would
            # hold back every line after it; taking it early only costs the idempotent double work)
            if 0 < wait <= self.grace_s:
                position = self.tailer.unread_from(index)
                self.wait_s = wait
                break
            due.append(line)
        self.skipped += skipped
        metrics.backstop_skipped.inc(skipped)
        return due, position, skipped

    async def rotate(self) -> None:
        """Keep the log bounded: rename it once large, then have Envoy start a new one. Called between steps, so
        every line read so far is committed or given back."""
        if self.reopen is None:
            return
        if self.rotate_bytes and await asyncio.to_thread(self.tailer.rotate_if_large, self.rotate_bytes):
            self._reopened_at = None
            self.rotations += 1
            log.info("usage log rotated (%d so far)", self.rotations)
        elif self.tailer.path.exists() and self._reopened_at is not None:
            return
        # Also retries a reopen that failed (Envoy restarting): until then Envoy writes to the renamed
        # file, which the tailer keeps reading, so nothing is lost meanwhile.
        try:
            await asyncio.to_thread(self.reopen)
            self._reopened_at = time.monotonic()
        except OSError as exc:
            log.debug("Envoy did not reopen its logs yet (%s); retrying", exc)

    async def run(self) -> None:
        backoff = POLL_INTERVAL_S
        while True:
            try:
                while await self.step():
                    pass
                await self.rotate()
                backoff = POLL_INTERVAL_S
                await asyncio.sleep(max(POLL_INTERVAL_S, self.wait_s))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("ledger unavailable (%s); usage stays spooled in %s", exc, self.tailer.path)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


async def run_exclusively(replayer: BackstopReplayer, lock_path: Path, retry_s: float = 0.5) -> None:
    """Runs the replayer while this process holds the usage log's lock; replicas of the accounting service
    (`crosslogic up --replicas N`) wait as standbys, and one takes over the moment the holder dies (the kernel
    drops a dead process's lock). Replaying twice would only be wasted work (the ledger and settlement are
    idempotent per request id), but two tailers would race over the position file and the rotation."""
    lock = open(lock_path, "a")  # noqa: SIM115, ASYNC230 - held for the life of the task; opening is instant
    try:
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(retry_s)
        log.info("replaying the usage log %s (this replica holds its lock)", replayer.tailer.path)
        await replayer.run()
    finally:
        lock.close()


def envoy_reopen_logs(admin_urls: str) -> Callable[[], None]:
    """Envoy's admin `POST /reopen_logs` on every gateway (`admin_urls`: comma-separated, all Envoys that write
    this log): access logs are reopened at their configured path. Fails unless every Envoy answered."""
    urls = [url.strip().rstrip("/") for url in admin_urls.split(",") if url.strip()]

    class Reopen:
        targets = len(urls)  # how many Envoys write the log (BackstopReplayer's grace after a rotation)

        def __call__(self) -> None:
            reopen()

    def reopen() -> None:
        failures: list[OSError] = []
        for url in urls:
            try:
                request = urllib.request.Request(url + "/reopen_logs", method="POST")
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
            except OSError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    return Reopen()
