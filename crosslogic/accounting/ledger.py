"""Batched, idempotent writes of usage records into the Postgres ledger (key: Envoy's request id).

Rows are priced inside the INSERT, by joining the version tables at each row's occurred_at (migration 007):
no cache, so nothing can be stale. Each batch first takes the price lock shared (a new version takes it
exclusively until it commits), so a batch never prices a row after the start of a version it cannot see.
A row that no version prices (unknown model, region or org at that moment) is held in `usage_unpriced`
and retried, never written at a guess.

A test key's rows (api_keys.mode 'test', migration 012; read here by key_id, a key's mode never changes) are
written with mode 'test' and cost 0, need no price version, and add nothing to the month's spend, the free
tier or the owed amount; the reporter never exports them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import asyncpg

from crosslogic.accounting import metrics
from crosslogic.accounting.recent import RecentIds
from crosslogic.usage_record import UsageRecord

log = logging.getLogger("crosslogic.accounting")

# The lock every version insert takes exclusively (migration 007, crosslogic_version_start).
PRICE_LOCK_SQL = "SELECT pg_advisory_xact_lock_shared(7271007)"
# One statement per batch; a request id already in the ledger is skipped, so replays never double-bill.
# The same statement adds what it inserted to the orgs' month-to-date spend and what they owe after their
# monthly allowance (spent in the order the ledger records usage), and returns, per org with a bill cap,
# the request ids now in the ledger (their bill-cap reservations can be released).
INSERT_USAGE_SQL = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[],
        $7::text[], $8::text[], $9::bool[], $10::int[], $11::int[], $12::int[], $13::text[], $14::int[],
        $15::text[])
        AS b(request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint, streamed, status_code,
             prompt_tokens, completion_tokens, usage_source, latency_ms, node_id)
), test_keys AS (  -- the batch's few distinct keys looked up once each, not once per row (bench/ledger.py)
    SELECT k.key_id FROM api_keys k WHERE k.key_id IN (SELECT DISTINCT key_id FROM batch) AND k.mode = 'test'
), priced AS (
    SELECT b.*, CASE WHEN tk.key_id IS NULL THEN 'live' ELSE 'test' END AS mode, p.price_version_id,
           p.input_price_microdollars_per_1m AS input_price,
           p.output_price_microdollars_per_1m AS output_price, r.multiplier_ppm AS region_ppm,
           t.tier_multiplier_ppm, t.discount_ppm
    FROM batch b
    LEFT JOIN test_keys tk ON tk.key_id = b.key_id
    LEFT JOIN LATERAL (SELECT v.price_version_id, v.input_price_microdollars_per_1m,
                              v.output_price_microdollars_per_1m
                       FROM price_versions v WHERE v.model_id = b.model AND v.effective_from <= b.occurred_at
                       ORDER BY v.effective_from DESC LIMIT 1) p ON true
    LEFT JOIN LATERAL (SELECT v.multiplier_ppm FROM region_multiplier_versions v
                       WHERE v.region_id = b.region AND v.effective_from <= b.occurred_at
                       ORDER BY v.effective_from DESC LIMIT 1) r ON true
    LEFT JOIN LATERAL (SELECT v.tier_multiplier_ppm, v.discount_ppm FROM org_terms_versions v
                       WHERE v.org_id = b.org_id AND v.effective_from <= b.occurred_at
                       ORDER BY v.effective_from DESC LIMIT 1) t ON true
), inserted AS (
    INSERT INTO usage_records (request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint,
        streamed, status_code, prompt_tokens, completion_tokens, total_tokens, usage_source, latency_ms,
        cost_microdollars, node_id, price_version_id, written_by, mode)
    SELECT request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint, streamed, status_code,
           prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, usage_source, latency_ms,
           CASE WHEN mode = 'test' THEN 0
                ELSE crosslogic_cost(prompt_tokens, completion_tokens, input_price, output_price, region_ppm,
                                     tier_multiplier_ppm, discount_ppm) END,
           node_id, CASE WHEN mode = 'test' THEN NULL ELSE price_version_id END, $16::text, mode
    FROM priced
    WHERE mode = 'test'
       OR (price_version_id IS NOT NULL AND region_ppm IS NOT NULL AND tier_multiplier_ppm IS NOT NULL)
    ORDER BY request_id
    ON CONFLICT (request_id) DO NOTHING
    RETURNING org_id, occurred_at, request_id, cost_microdollars, total_tokens, mode
), held AS (
    INSERT INTO usage_unpriced (request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint,
        streamed, status_code, prompt_tokens, completion_tokens, usage_source, latency_ms, node_id, written_by,
        missing)
    SELECT request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint, streamed, status_code,
           prompt_tokens, completion_tokens, usage_source, latency_ms, node_id, $16::text,
           CASE WHEN price_version_id IS NULL THEN 'price' WHEN region_ppm IS NULL THEN 'region multiplier'
                ELSE 'org terms' END
    FROM priced
    WHERE mode = 'live' AND (price_version_id IS NULL OR region_ppm IS NULL OR tier_multiplier_ppm IS NULL)
    ORDER BY request_id
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id
), monthly AS (
    SELECT org_id, date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month,
           sum(cost_microdollars) AS cost, sum(total_tokens) AS tokens,
           array_agg(total_tokens::bigint ORDER BY occurred_at, request_id) AS token_list,
           array_agg(cost_microdollars ORDER BY occurred_at, request_id) AS cost_list
    FROM inserted WHERE mode = 'live' GROUP BY 1, 2
), allowed AS (
    SELECT m.*, crosslogic_monthly_allowance(o.billing_plan, o.free_tokens_per_month,
               o.reserved_capacity_tokens_per_sec, o.reserved_overage_billed, m.month) AS allowance
    FROM monthly m JOIN orgs o ON o.org_id = m.org_id
), spend AS (
    INSERT INTO org_monthly_spend AS s (org_id, month, cost_microdollars, tokens, free_tokens, owed_microdollars)
    SELECT m.org_id, m.month, m.cost, m.tokens, a.free_tokens, a.owed
    FROM allowed m, LATERAL crosslogic_allocate(0, m.allowance, m.token_list, m.cost_list) a
    ORDER BY m.org_id, m.month
    ON CONFLICT (org_id, month) DO UPDATE SET
        cost_microdollars = s.cost_microdollars + EXCLUDED.cost_microdollars,
        tokens = s.tokens + EXCLUDED.tokens,
        (free_tokens, owed_microdollars) = (
            SELECT s.free_tokens + a.free_tokens, s.owed_microdollars + a.owed
            FROM allowed m, LATERAL crosslogic_allocate(s.free_tokens, m.allowance, m.token_list, m.cost_list) a
            WHERE m.org_id = s.org_id AND m.month = s.month)
    RETURNING 1
), capped AS (
    SELECT p.org_id, date_trunc('month', p.occurred_at AT TIME ZONE 'UTC')::date AS month,
           array_agg(p.request_id) AS request_ids
    FROM priced p JOIN orgs o ON o.org_id = p.org_id
    WHERE o.monthly_bill_cap_microdollars IS NOT NULL AND p.mode = 'live'
      AND p.price_version_id IS NOT NULL AND p.region_ppm IS NOT NULL AND p.tier_multiplier_ppm IS NOT NULL
    GROUP BY 1, 2
)
SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM held) AS held,
       (SELECT count(*) FROM spend) AS months,
       (SELECT json_agg(json_build_array(org_id, month, request_ids)) FROM capped) AS capped
"""
# Read after the batch committed (a fresh snapshot: it includes this batch and any writer it waited for).
_OWED_SQL = """
SELECT x.org_id::text AS org_id, x.month, coalesce(s.owed_microdollars, 0) AS owed
FROM unnest($1::uuid[], $2::date[]) AS x(org_id, month)
LEFT JOIN org_monthly_spend s ON s.org_id = x.org_id AND s.month = x.month
"""
_HELD_SQL = """
SELECT * FROM usage_unpriced WHERE request_id > $2 ORDER BY request_id LIMIT $1 FOR UPDATE SKIP LOCKED
"""
_UNHOLD_SQL = """
DELETE FROM usage_unpriced u USING usage_records r
WHERE u.request_id = ANY($1::text[]) AND r.request_id = u.request_id
"""
_HELD_COUNT_SQL = "SELECT count(*) FROM usage_unpriced"


@dataclass(frozen=True)
class MonthlyOwed:
    """What an org with a bill cap owes for a month, read after `request_ids` reached the ledger."""

    org_id: str
    month: date
    owed_microdollars: int
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class BatchResult:
    inserted: int  # rows new in the ledger
    held: int  # rows newly held for lack of a price version
    owed: list[MonthlyOwed] = field(default_factory=list)  # for bill-cap settlement


OwedHook = Callable[[list[MonthlyOwed]], None]


def _columns(records: list[UsageRecord]) -> list[list]:
    return [
        [r.request_id for r in records], [r.occurred_at for r in records], [r.org_id for r in records],
        [r.env_id for r in records], [r.key_id for r in records], [r.region for r in records],
        [r.model for r in records], [r.endpoint for r in records], [r.streamed for r in records],
        [r.status_code for r in records], [r.prompt_tokens for r in records],
        [r.completion_tokens for r in records], [r.usage_source for r in records],
        [r.latency_ms for r in records], [r.node for r in records],
    ]


async def write_batch(conn: asyncpg.Connection, records: list[UsageRecord], written_by: str = "als") -> BatchResult:
    """Prices and inserts the records not yet in the ledger (holding those no version prices).

    Sorted by request id so two writers inserting overlapping batches (fast path and backstop) take row
    locks in the same order and cannot deadlock.
    """
    if not records:
        return BatchResult(0, 0)
    ordered = sorted(records, key=lambda r: r.request_id)
    async with conn.transaction():
        await conn.execute(PRICE_LOCK_SQL)  # its own statement: the INSERT's snapshot is taken after the wait
        row = await conn.fetchrow(INSERT_USAGE_SQL, *_columns(ordered), written_by)
    result = BatchResult(row["inserted"], row["held"])
    if row["held"]:
        log.warning("%d usage rows held: no price, region multiplier or org terms in effect at their time",
                    row["held"])
    if row["capped"] is None:
        return result
    capped = json.loads(row["capped"])
    owed = {(r["org_id"], r["month"]): r["owed"] for r in await conn.fetch(
        _OWED_SQL, [c[0] for c in capped], [date.fromisoformat(c[1]) for c in capped])}
    result.owed.extend(MonthlyOwed(org, date.fromisoformat(month), owed[(org, date.fromisoformat(month))],
                                   tuple(ids)) for org, month, ids in capped)
    return result


def _record(row: asyncpg.Record) -> UsageRecord:
    return UsageRecord(request_id=row["request_id"], occurred_at=row["occurred_at"], org_id=str(row["org_id"]),
                       env_id=str(row["env_id"]), key_id=str(row["key_id"]), region=row["region"],
                       model=row["model"], endpoint=row["endpoint"], streamed=row["streamed"],
                       status_code=row["status_code"], prompt_tokens=row["prompt_tokens"],
                       completion_tokens=row["completion_tokens"], usage_source=row["usage_source"],
                       latency_ms=row["latency_ms"], node=row["node_id"])


async def price_held(conn: asyncpg.Connection, page: int = 2000) -> BatchResult:
    """Tries every held row again (a version may exist now), a page per transaction; those priced leave
    usage_unpriced, the others stay."""
    inserted, owed, after = 0, [], ""
    while True:
        async with conn.transaction():
            rows = await conn.fetch(_HELD_SQL, page, after)
            if not rows:
                return BatchResult(inserted, 0, owed)
            by_path: dict[str, list[UsageRecord]] = {}
            for row in rows:
                by_path.setdefault(row["written_by"], []).append(_record(row))
            for path, records in by_path.items():
                result = await write_batch(conn, records, path)
                inserted += result.inserted
                owed += result.owed
            await conn.execute(_UNHOLD_SQL, [r["request_id"] for r in rows])
            after = rows[-1]["request_id"]


async def held_count(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    return int(await conn.fetchval(_HELD_COUNT_SQL))


class LedgerWriter:
    """Collects records and flushes them in batches; keeps them (and retries) while Postgres is away."""

    def __init__(self, pool: asyncpg.Pool, batch_size: int, flush_interval_s: float,
                 committed: RecentIds | None = None, on_owed: OwedHook | None = None) -> None:
        self.pool = pool
        self.committed = committed  # ids now in the ledger, for the backstop to skip
        self.on_owed = on_owed  # bill-cap settlement (crosslogic.ratelimit.money)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.pending: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self.written = 0

    def add(self, record: UsageRecord) -> None:
        self.pending.append(record)
        metrics.ledger_pending.set(len(self.pending))
        if len(self.pending) >= self.batch_size:
            self._wake.set()

    async def flush(self) -> None:
        while self.pending:
            batch = self.pending[: self.batch_size]
            async with self.pool.acquire() as conn:
                result = await write_batch(conn, batch)
            if self.committed is not None:  # inserted now or before (or held): either way not to replay
                self.committed.add_many(r.request_id for r in batch)
            if result.owed and self.on_owed is not None:
                self.on_owed(result.owed)
            self.written += result.inserted
            metrics.ledger_rows.labels("als").inc(result.inserted)
            del self.pending[: len(batch)]
            metrics.ledger_pending.set(len(self.pending))

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("ledger unavailable (%s); %d records held for retry", exc, len(self.pending))
                await asyncio.sleep(1.0)


class HeldRows:
    """Retries held rows when prices change (NOTIFY crosslogic_prices) and every `interval_s`."""

    def __init__(self, pool: asyncpg.Pool, on_owed: OwedHook | None = None, interval_s: float = 30.0) -> None:
        self.pool = pool
        self.on_owed = on_owed
        self.interval_s = interval_s
        self.wake = asyncio.Event()

    async def step(self) -> int:
        async with self.pool.acquire() as conn:
            result = await price_held(conn)
            metrics.unpriced_rows.set(await held_count(conn))
        if result.owed and self.on_owed is not None:
            self.on_owed(result.owed)
        metrics.ledger_rows.labels("held").inc(result.inserted)
        if result.inserted:
            log.info("%d held usage rows priced and written", result.inserted)
        return result.inserted

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.step()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("held usage rows not retried (%s)", exc)
