"""Batched, idempotent writes of usage records into the Postgres ledger (key: Envoy's request id)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import asyncpg

from crosslogic.accounting import metrics
from crosslogic.accounting.pricing import PPM, ModelPrice, OrgTerms, cost_microdollars, effective_at
from crosslogic.accounting.recent import RecentIds
from crosslogic.accounting.usage import UsageRecord

log = logging.getLogger("crosslogic.accounting")

# One statement per batch; a request id already in the ledger is skipped, so replays never double-bill.
# The same statement adds what it inserted to the orgs' month-to-date spend (the bill cap reads that).
INSERT_USAGE_SQL = """
WITH inserted AS (
    INSERT INTO usage_records (request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint,
        streamed, status_code, prompt_tokens, completion_tokens, total_tokens, usage_source, latency_ms,
        cost_microdollars, node_id, price_version_id, written_by)
    SELECT *, $19::text FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[],
        $7::text[], $8::text[], $9::bool[], $10::int[], $11::int[], $12::int[], $13::int[], $14::text[],
        $15::int[], $16::bigint[], $17::text[], $18::bigint[])
    ON CONFLICT (request_id) DO NOTHING
    RETURNING org_id, occurred_at, cost_microdollars, total_tokens
), monthly AS (
    SELECT org_id, date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month,
           sum(cost_microdollars) AS cost, sum(total_tokens) AS tokens, count(*) AS n
    FROM inserted GROUP BY 1, 2
), spend AS (
    INSERT INTO org_monthly_spend (org_id, month, cost_microdollars, tokens)
    SELECT org_id, month, cost, tokens FROM monthly ORDER BY org_id, month
    ON CONFLICT (org_id, month) DO UPDATE SET
        cost_microdollars = org_monthly_spend.cost_microdollars + EXCLUDED.cost_microdollars,
        tokens = org_monthly_spend.tokens + EXCLUDED.tokens
)
SELECT coalesce(sum(n), 0)::bigint FROM monthly
"""
_PRICES_SQL = """
SELECT price_version_id, model_id, effective_from, input_price_microdollars_per_1m,
       output_price_microdollars_per_1m
FROM price_versions ORDER BY model_id, effective_from
"""
_REGIONS_SQL = "SELECT region_id, effective_from, multiplier_ppm FROM region_multiplier_versions ORDER BY 1, 2"
_ORG_TERMS_SQL = """
SELECT o.org_id::text AS org_id, t.multiplier_ppm, o.discount_ppm
FROM orgs o JOIN pricing_tiers t ON t.tier_id = o.pricing_tier
WHERE o.pricing_tier <> 'standard' OR o.discount_ppm <> 0
"""
PRICE_REFRESH_S = 30.0
_FREE = ModelPrice(0, 0)


class PriceBook:
    """Prices as they were at any moment: a record is priced by the versions in effect when it happened."""

    def __init__(self) -> None:
        self.models: dict[str, list[tuple[datetime, ModelPrice]]] = {}
        self.regions: dict[str, list[tuple[datetime, int]]] = {}
        self.orgs: dict[str, OrgTerms] = {}
        self.loaded_at = -PRICE_REFRESH_S

    async def refresh_if_old(self, conn: asyncpg.Connection) -> None:
        if time.monotonic() - self.loaded_at < PRICE_REFRESH_S:
            return
        await self.refresh(conn)

    async def refresh(self, conn: asyncpg.Connection) -> None:
        models: dict[str, list[tuple[datetime, ModelPrice]]] = {}
        for r in await conn.fetch(_PRICES_SQL):
            models.setdefault(r["model_id"], []).append((_start(r["effective_from"]), ModelPrice(
                r["input_price_microdollars_per_1m"], r["output_price_microdollars_per_1m"], r["price_version_id"])))
        regions: dict[str, list[tuple[datetime, int]]] = {}
        for r in await conn.fetch(_REGIONS_SQL):
            regions.setdefault(r["region_id"], []).append((_start(r["effective_from"]), r["multiplier_ppm"]))
        self.models, self.regions = models, regions
        self.orgs = {r["org_id"]: OrgTerms(r["multiplier_ppm"], r["discount_ppm"])
                     for r in await conn.fetch(_ORG_TERMS_SQL)}
        self.loaded_at = time.monotonic()

    def price(self, record: UsageRecord) -> ModelPrice:
        found = effective_at(self.models.get(record.model, []), record.occurred_at)
        return found if isinstance(found, ModelPrice) else _FREE

    def cost(self, record: UsageRecord) -> int:
        region = effective_at(self.regions.get(record.region, []), record.occurred_at)
        return cost_microdollars(record.prompt_tokens, record.completion_tokens, self.price(record),
                                 region if isinstance(region, int) else PPM, self.orgs.get(record.org_id))


def _start(value: datetime) -> datetime:
    """asyncpg gives -infinity as datetime.min (naive): make every start comparable with aware times."""
    return value if value.tzinfo else datetime.min.replace(tzinfo=UTC)


def _columns(records: list[UsageRecord], prices: PriceBook) -> list[list]:
    return [
        [r.request_id for r in records], [r.occurred_at for r in records], [r.org_id for r in records],
        [r.env_id for r in records], [r.key_id for r in records], [r.region for r in records],
        [r.model for r in records], [r.endpoint for r in records], [r.streamed for r in records],
        [r.status_code for r in records], [r.prompt_tokens for r in records],
        [r.completion_tokens for r in records], [r.total_tokens for r in records],
        [r.usage_source for r in records], [r.latency_ms for r in records],
        [prices.cost(r) for r in records], [r.node for r in records],
        [prices.price(r).version_id for r in records],
    ]


async def write_batch(conn: asyncpg.Connection, records: list[UsageRecord], prices: PriceBook,
                      written_by: str = "als") -> int:
    """Inserts the records not yet in the ledger; returns how many were new.

    Sorted by request id so two writers inserting overlapping batches (fast path and backstop) take row
    locks in the same order and cannot deadlock.
    """
    await prices.refresh_if_old(conn)
    ordered = sorted(records, key=lambda r: r.request_id)
    return int(await conn.fetchval(INSERT_USAGE_SQL, *_columns(ordered, prices), written_by))


class LedgerWriter:
    """Collects records and flushes them in batches; keeps them (and retries) while Postgres is away."""

    def __init__(self, pool: asyncpg.Pool, batch_size: int, flush_interval_s: float,
                 committed: RecentIds | None = None) -> None:
        self.pool = pool
        self.committed = committed  # ids now in the ledger, for the backstop to skip
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.pending: list[UsageRecord] = []
        self.prices = PriceBook()
        self._wake = asyncio.Event()
        self.written = 0

    def add(self, record: UsageRecord) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.batch_size:
            self._wake.set()

    async def flush(self) -> None:
        while self.pending:
            batch = self.pending[: self.batch_size]
            async with self.pool.acquire() as conn:
                inserted = await write_batch(conn, batch, self.prices)
            if self.committed is not None:  # inserted now or before: either way in the ledger
                self.committed.add_many(r.request_id for r in batch)
            self.written += inserted
            metrics.ledger_rows.labels("als").inc(inserted)
            del self.pending[: len(batch)]

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
