"""Billing reporter: unexported ledger rows -> Stripe Billing Meter Events, exactly once.

Two steps, each safe to repeat or to interrupt anywhere:
1. prepare: in one transaction, lock live rows not yet exported (test keys' rows are free: never exported),
   apply the org's plan (monthly free tier for serverless, included capacity for reserved), group them per org,
   model and interval, and write one `billing_exports` row per group, with a deterministic identifier derived
   from the group's content. Rows point at their export. Nothing leaves the database in this step.
2. send: every export not yet sent (and due) goes to Stripe with that identifier (also as the
   Idempotency-Key). Success -> export `sent`, rows `billed`. Failure -> `failed`, retry_count + 1,
   rows `billing_failed`, next attempt after exponential backoff capped at 15 minutes.
A crash between Stripe's answer and our commit re-sends the same identifier: Stripe counts it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import stripe

from crosslogic.accounting import metrics
from crosslogic.accounting.pricing import allocate_allowance

log = logging.getLogger("crosslogic.accounting.reporter")
COST_METER = "crosslogic_cost_microdollars"
PREPARE_LIMIT = 20_000
# One preparer at a time (the service's loop and a `crosslogic billing run` may overlap): the free tier
# still left is read from committed exports, so two concurrent preparers could both hand it out.
_PREPARE_LOCK_SQL = "SELECT pg_advisory_xact_lock(7271005)"

_UNEXPORTED_SQL = """
SELECT u.usage_id, u.request_id, u.org_id, u.model, u.occurred_at, u.total_tokens, u.cost_microdollars,
       crosslogic_monthly_allowance(o.billing_plan, o.free_tokens_per_month, o.reserved_capacity_tokens_per_sec,
           o.reserved_overage_billed, date_trunc('month', u.occurred_at AT TIME ZONE 'UTC')::date) AS allowance,
       coalesce(o.stripe_customer_id, o.org_id::text) AS customer
FROM usage_records u JOIN orgs o ON o.org_id = u.org_id
WHERE u.export_id IS NULL AND u.mode = 'live'
ORDER BY u.org_id, u.occurred_at, u.request_id
LIMIT $1
FOR UPDATE OF u SKIP LOCKED
"""
_ALLOWANCE_USED_SQL = """
SELECT coalesce(sum(free_tokens), 0) FROM usage_records
WHERE org_id = $1 AND export_id IS NOT NULL AND occurred_at >= $2 AND occurred_at < $3
"""
_INSERT_EXPORT_SQL = """
INSERT INTO billing_exports (org_id, meter, model, interval_start, stripe_customer_id, value, tokens, identifier)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING export_id
"""
_LINK_ROWS_SQL = """
UPDATE usage_records u SET export_id = $1, free_tokens = x.free, billable_microdollars = x.billable
FROM unnest($2::uuid[], $3::int[], $4::bigint[]) AS x(usage_id, free, billable)
WHERE u.usage_id = x.usage_id
"""
_DUE_SQL = """
SELECT export_id, meter, stripe_customer_id, value, tokens, model, identifier, interval_start, retry_count,
       regenerations
FROM billing_exports WHERE status <> 'sent' AND next_attempt_at <= now()
ORDER BY export_id LIMIT $1
"""
_SENT_SQL = """
WITH e AS (UPDATE billing_exports SET status = 'sent', sent_at = now(), last_error = NULL
           WHERE export_id = $1 AND status <> 'sent' RETURNING export_id)
UPDATE usage_records SET billed = true, billing_failed = false WHERE export_id IN (SELECT export_id FROM e)
"""
_FAILED_SQL = """
WITH e AS (UPDATE billing_exports SET status = 'failed', retry_count = retry_count + 1, last_error = $2,
               next_attempt_at = now() + make_interval(secs => $3)
           WHERE export_id = $1 RETURNING export_id, retry_count)
UPDATE usage_records u SET billing_failed = true, retry_count = e.retry_count FROM e WHERE u.export_id = e.export_id
"""


@dataclass(frozen=True)
class ReporterSettings:
    interval_s: int = 60
    meter: str = COST_METER
    retry_base_s: float = 60.0
    retry_max_s: float = 900.0  # failed exports are retried at least every 15 minutes


@dataclass(frozen=True)
class RunResult:
    exports_prepared: int
    sent: int
    failed: int


def backoff_s(retry_count: int, base: float, cap: float) -> float:
    """Exponential: base, 2*base, 4*base ... never more than cap."""
    return min(cap, base * (2 ** min(retry_count, 30)))


def month_bounds(at: datetime) -> tuple[datetime, datetime]:
    start = at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def interval_start(at: datetime, interval_s: int) -> datetime:
    epoch = int(at.timestamp())
    return datetime.fromtimestamp(epoch - epoch % interval_s, UTC)


def export_identifier(org_id: str, meter: str, model: str, start: datetime, usage_ids: Sequence[str]) -> str:
    """Deterministic: the same group of rows always yields the same identifier (max 100 chars)."""
    digest = hashlib.sha256("|".join([org_id, meter, model, start.isoformat(), *sorted(usage_ids)]).encode())
    return "clp_" + digest.hexdigest()[:48]


async def prepare_exports(conn: asyncpg.Connection, settings: ReporterSettings) -> int:
    async with conn.transaction():
        await conn.execute(_PREPARE_LOCK_SQL)
        rows = await conn.fetch(_UNEXPORTED_SQL, PREPARE_LIMIT)
        by_org_month: dict[tuple, list[asyncpg.Record]] = {}
        for r in rows:
            by_org_month.setdefault((r["org_id"], month_bounds(r["occurred_at"])), []).append(r)
        groups: dict[tuple, list[tuple[asyncpg.Record, int, int]]] = {}
        for (org_id, (start, end)), org_rows in by_org_month.items():
            # The allowance (crosslogic_monthly_allowance, migration 007: the ledger's definition too): free
            # tier, reserved capacity (all of it when overage is not billed), none for enterprise.
            used = await conn.fetchval(_ALLOWANCE_USED_SQL, org_id, start, end)
            allocations = allocate_allowance([(r["total_tokens"], r["cost_microdollars"]) for r in org_rows],
                                             org_rows[0]["allowance"] - used)
            for r, a in zip(org_rows, allocations, strict=True):
                billable = a.billable_microdollars
                key = (org_id, r["model"], interval_start(r["occurred_at"], settings.interval_s), r["customer"])
                groups.setdefault(key, []).append((r, a.free_tokens, billable))
        for (org_id, model, start, customer), members in groups.items():
            ids = [str(r["usage_id"]) for r, _, _ in members]
            export_id = await conn.fetchval(
                _INSERT_EXPORT_SQL, org_id, settings.meter, model, start, customer,
                sum(b for _, _, b in members), sum(r["total_tokens"] for r, _, _ in members),
                export_identifier(str(org_id), settings.meter, model, start, ids))
            await conn.execute(_LINK_ROWS_SQL, export_id, [r["usage_id"] for r, _, _ in members],
                               [f for _, f, _ in members], [b for _, _, b in members])
        return len(groups)


def _is_duplicate(exc: stripe.StripeError) -> bool:
    """Stripe already holds this identifier: an earlier attempt got through before we could record it."""
    error = getattr(exc, "error", None)
    return getattr(error, "code", None) == "resource_already_exists" and getattr(error, "param", None) == "identifier"


class BillingReporter:
    def __init__(self, pool: asyncpg.Pool, client: stripe.StripeClient, settings: ReporterSettings) -> None:
        self.pool = pool
        self.client = client
        self.settings = settings
        self._meter_ready = False

    async def ensure_meter(self) -> None:
        if self._meter_ready:
            return

        def active() -> bool:
            meters = self.client.v1.billing.meters.list()
            return any(m.event_name == self.settings.meter and m.status == "active" for m in meters.data)

        def ensure() -> None:
            if active():
                return
            try:
                self.client.v1.billing.meters.create(params={
                    "display_name": "CrossLogic usage (micro-dollars)", "event_name": self.settings.meter,
                    "default_aggregation": {"formula": "sum"}})
            except stripe.InvalidRequestError:
                # Another replica's reporter created it between our list and our create.
                if not active():
                    raise

        await asyncio.to_thread(ensure)
        self._meter_ready = True

    async def _send_one(self, export: asyncpg.Record) -> None:
        params = {"event_name": export["meter"], "identifier": export["identifier"],
                  "timestamp": int(export["interval_start"].timestamp()),
                  "payload": {"stripe_customer_id": export["stripe_customer_id"], "value": str(export["value"])}}
        # A regenerated export needs a fresh Idempotency-Key (else Stripe replays the old answer and records
        # nothing); the unchanged identifier still makes Stripe count the event at most once.
        key = export["identifier"] + (f"-g{export['regenerations']}" if export["regenerations"] else "")
        await asyncio.to_thread(self.client.v1.billing.meter_events.create, params, {"idempotency_key": key})

    async def send_due(self, limit: int = 1000) -> tuple[int, int]:
        async with self.pool.acquire() as conn:
            due = await conn.fetch(_DUE_SQL, limit)
        sent = failed = 0
        for export in due:
            try:
                try:
                    await self._send_one(export)
                except stripe.StripeError as exc:
                    if not _is_duplicate(exc):
                        raise
                async with self.pool.acquire() as conn:
                    await conn.execute(_SENT_SQL, export["export_id"])
                sent += 1
                metrics.meter_events_sent.inc()
                metrics.exported_tokens.labels(export["model"]).inc(export["tokens"])
                metrics.exported_microdollars.labels(export["model"]).inc(export["value"])
            except stripe.StripeError as exc:
                delay = backoff_s(export["retry_count"], self.settings.retry_base_s, self.settings.retry_max_s)
                log.warning("Stripe refused export %s (%s); retry in %.0fs", export["export_id"], exc, delay)
                async with self.pool.acquire() as conn:
                    await conn.execute(_FAILED_SQL, export["export_id"], str(exc)[:500], delay)
                failed += 1
                metrics.meter_events_failed.inc()
        return sent, failed

    async def run_once(self) -> RunResult:
        prepared = 0
        while True:
            async with self.pool.acquire() as conn:
                made = await prepare_exports(conn, self.settings)
            prepared += made
            if made == 0:
                break
        await self.ensure_meter()
        sent = failed = 0
        while True:
            s, f = await self.send_due()
            sent, failed = sent + s, failed + f
            if s + f == 0 or s == 0:
                break
        return RunResult(prepared, sent, failed)

    async def run_forever(self) -> None:
        """The accounting service's loop: never raises, never touches the request path."""
        while True:
            try:
                result = await self.run_once()
                if result.sent or result.failed:
                    log.info("billing run: %s", result)
                if not result.failed:
                    metrics.last_export_success.set_to_current_time()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, stripe.StripeError) as exc:
                metrics.export_runs_failed.inc()
                log.warning("billing run failed (%s); next run in %ss", exc, self.settings.interval_s)
            try:
                async with self.pool.acquire() as conn:
                    await observe_billing_state(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.debug("billing state not read (%s)", exc)
            await asyncio.sleep(self.settings.interval_s)


_UNBILLED_SQL = """
SELECT count(*) AS n, coalesce(sum(cost_microdollars), 0)::bigint AS microdollars,
       coalesce(EXTRACT(EPOCH FROM now() - min(recorded_at)), 0)::float8 AS oldest_s
FROM usage_records WHERE NOT billed AND mode = 'live'
"""  # the partial index usage_records_unbilled_idx: with Stripe working, few rows (test keys' rows: never billed)
_OPEN_EXPORTS_SQL = "SELECT status, count(*) AS n FROM billing_exports WHERE status <> 'sent' GROUP BY status"
EXPORT_STATUSES = ("pending", "failed")


async def observe_billing_state(conn: asyncpg.Connection) -> None:
    """What an operator alerts on when exports stall: rows and money Stripe has not accepted, and for how long."""
    row = await conn.fetchrow(_UNBILLED_SQL)
    metrics.unbilled_rows.set(row["n"])
    metrics.unbilled_microdollars.set(row["microdollars"])
    metrics.oldest_unbilled_seconds.set(row["oldest_s"])
    open_by_status = {r["status"]: r["n"] for r in await conn.fetch(_OPEN_EXPORTS_SQL)}
    for status in {*EXPORT_STATUSES, *open_by_status}:
        metrics.exports_open.labels(status).set(open_by_status.get(status, 0))


def stripe_client(api_key: str, api_base: str = "") -> stripe.StripeClient:
    """The official SDK; `api_base` points it at a local Stripe-compatible server (tests never go online)."""
    addresses = {"api": api_base} if api_base else None
    return stripe.StripeClient(api_key, base_addresses=addresses, max_network_retries=2)
