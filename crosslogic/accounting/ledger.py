"""Batched, idempotent writes of usage records into the Postgres ledger (key: Envoy's request id)."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from crosslogic.accounting.pricing import PPM, ModelPrice, cost_microdollars
from crosslogic.accounting.usage import UsageRecord

log = logging.getLogger("crosslogic.accounting")

# One statement per batch; a request id already in the ledger is skipped, so replays never double-bill.
INSERT_USAGE_SQL = """
INSERT INTO usage_records (request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint,
    streamed, status_code, prompt_tokens, completion_tokens, total_tokens, usage_source, latency_ms,
    cost_microdollars, node_id)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[],
    $7::text[], $8::text[], $9::bool[], $10::int[], $11::int[], $12::int[], $13::int[], $14::text[],
    $15::int[], $16::bigint[], $17::text[])
ON CONFLICT (request_id) DO NOTHING
"""
_PRICES_SQL = "SELECT model_id, input_price_microdollars_per_1m, output_price_microdollars_per_1m FROM models"
_REGIONS_SQL = "SELECT region_id, price_multiplier_ppm FROM regions"
PRICE_REFRESH_S = 30.0


class PriceBook:
    def __init__(self) -> None:
        self.models: dict[str, ModelPrice] = {}
        self.regions: dict[str, int] = {}
        self.loaded_at = 0.0

    async def refresh_if_old(self, conn: asyncpg.Connection) -> None:
        if time.monotonic() - self.loaded_at < PRICE_REFRESH_S:
            return
        self.models = {r["model_id"]: ModelPrice(r["input_price_microdollars_per_1m"],
                                                 r["output_price_microdollars_per_1m"])
                       for r in await conn.fetch(_PRICES_SQL)}
        self.regions = {r["region_id"]: r["price_multiplier_ppm"] for r in await conn.fetch(_REGIONS_SQL)}
        self.loaded_at = time.monotonic()

    def cost(self, record: UsageRecord) -> int:
        price = self.models.get(record.model, ModelPrice(0, 0))
        return cost_microdollars(record.prompt_tokens, record.completion_tokens, price,
                                 self.regions.get(record.region, PPM))


def _columns(records: list[UsageRecord], prices: PriceBook) -> list[list]:
    return [
        [r.request_id for r in records], [r.occurred_at for r in records], [r.org_id for r in records],
        [r.env_id for r in records], [r.key_id for r in records], [r.region for r in records],
        [r.model for r in records], [r.endpoint for r in records], [r.streamed for r in records],
        [r.status_code for r in records], [r.prompt_tokens for r in records],
        [r.completion_tokens for r in records], [r.total_tokens for r in records],
        [r.usage_source for r in records], [r.latency_ms for r in records],
        [prices.cost(r) for r in records], [r.node for r in records],
    ]


async def write_batch(conn: asyncpg.Connection, records: list[UsageRecord], prices: PriceBook) -> int:
    await prices.refresh_if_old(conn)
    status = await conn.execute(INSERT_USAGE_SQL, *_columns(records, prices))
    return int(status.split()[-1])


class LedgerWriter:
    """Collects records and flushes them in batches; keeps them (and retries) while Postgres is away."""

    def __init__(self, pool: asyncpg.Pool, batch_size: int, flush_interval_s: float) -> None:
        self.pool = pool
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
                self.written += await write_batch(conn, batch, self.prices)
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
