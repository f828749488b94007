"""A site's usage: Envoy's access-log stream -> a durable spool on the site's disk -> the cloud's ledger.

The spool is SQLite (WAL, synchronous=FULL): a record is on disk before the access-log call returns, keyed by the
request id (a record seen twice is kept once). The pusher sends the oldest records in batches to the site API
(`POST /site/v1/usage`) and deletes them only once the cloud answered that they are in the ledger. Exactly once:
the ledger skips a request id it already holds, so a batch re-sent after a lost answer (the link cut between the
cloud's commit and our delete, or a crash of this process there) is not billed twice; a record leaves the spool
only after the cloud has it, so none is lost while the link is down, however long.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import aiohttp
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from crosslogic.accounting.usage import record_from_entry
from crosslogic.sites.protocol import USAGE_PATH, client_context, record_from_json, record_to_json
from crosslogic.sites.quota import SiteQuotas, exchange
from crosslogic.usage_record import UsageRecord

log = logging.getLogger("crosslogic.sites")


class Spool:
    """Blocking SQLite calls; the site process runs them in a thread (`run`), one at a time, so an fsync never
    stalls the event loop that answers ext_authz."""

    def __init__(self, path: Path) -> None:
        self._lock = asyncio.Lock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                        "request_id TEXT NOT NULL UNIQUE, record TEXT NOT NULL)")
        path.chmod(0o600)

    def add(self, records: list[UsageRecord]) -> None:
        if records:
            with self.db:  # one transaction: on disk (fsync) before the caller goes on
                self.db.executemany("INSERT OR IGNORE INTO spool (request_id, record) VALUES (?, ?)",
                                    [(r.request_id, json.dumps(record_to_json(r))) for r in records])

    def oldest(self, limit: int) -> list[tuple[int, UsageRecord]]:
        rows = self.db.execute("SELECT seq, record FROM spool ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [(seq, record_from_json(json.loads(text))) for seq, text in rows]

    def delete_through(self, seqs: list[int]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs])

    def pending(self) -> int:
        return self.db.execute("SELECT count(*) FROM spool").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    async def run(self, fn, *args):
        async with self._lock:
            return await asyncio.to_thread(fn, *args)


class SpoolingSink(als_pb2_grpc.AccessLogServiceServicer):
    """The site's access-log service: each message's records go to the spool in one durable transaction."""

    def __init__(self, spool: Spool, wake: asyncio.Event, quotas: SiteQuotas | None = None,
                 settle: Callable[[UsageRecord], None] | None = None) -> None:
        self.spool = spool
        self.wake = wake
        self.quotas = quotas
        self.settle = settle  # the site limiter's settlement (ratelimit/settlement.py), idempotent per request

    async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802 (gRPC name)
        async for message in request_iterator:
            records = [r for r in map(record_from_entry, message.http_logs.log_entry) if r is not None]
            await self.spool.run(self.spool.add, records)  # on disk before the next message is read
            if self.quotas is not None:
                self.quotas.spooled(records)
            if self.settle is not None:
                for record in records:
                    self.settle(record)
            if records:
                self.wake.set()
        return als_pb2.StreamAccessLogsResponse()


class Pusher:
    """Delivers the spool to the cloud, oldest first, forever; backs off while the cloud cannot be reached."""

    def __init__(self, spool: Spool, cloud_url: str, tls_dir: Path, wake: asyncio.Event, batch: int = 2000,
                 interval_s: float = 0.5, max_backoff_s: float = 5.0, quotas: SiteQuotas | None = None) -> None:
        self.spool = spool
        self.quotas = quotas
        self.url = cloud_url.rstrip("/") + USAGE_PATH
        self.ssl = client_context(tls_dir)
        self.wake = wake
        self.batch = batch
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.delivered = 0

    async def push_once(self, session: aiohttp.ClientSession) -> int:
        """Sends one batch; returns how many records left the spool."""
        async with exchange(self.quotas):  # no sync meanwhile (sites/quota.py)
            return await self._push(session)

    async def _push(self, session: aiohttp.ClientSession) -> int:
        rows = await self.spool.run(self.spool.oldest, self.batch)
        if not rows:
            return 0
        body = {"records": [record_to_json(r) for _, r in rows]}
        async with session.post(self.url, json=body, ssl=self.ssl,
                                timeout=aiohttp.ClientTimeout(total=15)) as response:
            if response.status != 200:
                raise RuntimeError(f"site API answered {response.status}: {(await response.text())[:200]}")
        await self.spool.run(self.spool.delete_through, [seq for seq, _ in rows])
        if self.quotas is not None:
            self.quotas.acknowledged([r for _, r in rows])
        self.delivered += len(rows)
        return len(rows)

    async def run(self) -> None:
        backoff = self.interval_s
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    while await self.push_once(session) == self.batch:
                        pass  # more waiting: no pause between full batches
                    backoff = self.interval_s
                except (OSError, aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                    log.warning("usage push failed (%s); %d records kept in the spool", exc,
                                await self.spool.run(self.spool.pending))
                    backoff = min(self.max_backoff_s, backoff * 2)
                    await asyncio.sleep(backoff)  # new records do not hurry a retry while the cloud is away
                    continue
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), self.interval_s)
                except TimeoutError:
                    pass
