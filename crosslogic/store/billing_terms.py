"""Billing terms as data functions: org caps and plans, price versions, GPU prices (admin CLI uses them)."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from crosslogic.store import tenancy
from crosslogic.store.tenancy import Db, InvalidArgument, NotFound

SQL_UPDATE_ORG_TERMS = """
UPDATE orgs SET
    monthly_bill_cap_microdollars = CASE WHEN $2 THEN $3 ELSE monthly_bill_cap_microdollars END,
    suspend_at_cap = coalesce($4, suspend_at_cap),
    free_tokens_per_month = coalesce($5, free_tokens_per_month),
    discount_ppm = coalesce($6, discount_ppm),
    pricing_tier = coalesce($7, pricing_tier),
    stripe_customer_id = coalesce($8, stripe_customer_id),
    bill_cap_fail_closed = coalesce($9, bill_cap_fail_closed)
WHERE org_id = $1
RETURNING org_id::text, monthly_bill_cap_microdollars, suspend_at_cap, free_tokens_per_month, discount_ppm,
          pricing_tier, stripe_customer_id, bill_cap_fail_closed
"""
SQL_INSERT_PRICE_VERSION = """
INSERT INTO price_versions (model_id, effective_from, input_price_microdollars_per_1m,
                            output_price_microdollars_per_1m)
VALUES ($1, $2, $3, $4) RETURNING price_version_id
"""
SQL_UPSERT_GPU_PRICE = """
INSERT INTO gpu_prices (gpu_type, cloud, spot, microdollars_per_hour) VALUES ($1, $2, $3, $4)
ON CONFLICT (gpu_type, cloud, spot) DO UPDATE SET microdollars_per_hour = EXCLUDED.microdollars_per_hour
"""


@dataclass(frozen=True)
class OrgBillingTerms:
    org_id: str
    monthly_bill_cap_microdollars: int | None
    suspend_at_cap: bool
    free_tokens_per_month: int
    discount_ppm: int
    pricing_tier: str
    stripe_customer_id: str | None
    bill_cap_fail_closed: bool  # Valkey unreachable: 503 instead of the ledger's after-the-fact check


@tenancy.db_errors
async def set_org_terms(db: Db, org: str, *, cap_usd: str | None = None, clear_cap: bool = False,
                        suspend_at_cap: bool | None = None, free_tokens: int | None = None,
                        discount: str | None = None, tier: str | None = None,
                        stripe_customer: str | None = None, cap_fail_closed: bool | None = None,
                        actor: str = "system") -> OrgBillingTerms:
    owner = await tenancy.get_org(db, org)
    cap = None if clear_cap or cap_usd is None else tenancy.dollars_to_microdollars(cap_usd)
    discount_ppm = None if discount is None else tenancy.multiplier_to_ppm(discount) if discount != "0" else 0
    if discount_ppm is not None and discount_ppm > 1_000_000:
        raise InvalidArgument("discount is a fraction between 0 and 1 (0.15 = 15% off)")
    if free_tokens is not None and free_tokens < 0:
        raise InvalidArgument("free tokens per month must be >= 0")
    if tier is not None and await db.fetchval("SELECT 1 FROM pricing_tiers WHERE tier_id = $1", tier) is None:
        raise NotFound(f"pricing tier {tier!r} not found")
    async with tenancy.transaction(db) as conn:
        row = await conn.fetchrow(SQL_UPDATE_ORG_TERMS, uuid.UUID(owner.org_id), clear_cap or cap_usd is not None,
                                  cap, suspend_at_cap, free_tokens, discount_ppm, tier, stripe_customer,
                                  cap_fail_closed)
        terms = OrgBillingTerms(*row.values())
        details = {k: v for k, v in asdict(terms).items() if k != "stripe_customer_id"}
        await tenancy.audit(conn, actor, "billing.terms", "org", owner.org_id, details)
        return terms


@tenancy.db_errors
async def schedule_price(db: Db, model: str, input_usd_per_1m: str, output_usd_per_1m: str,
                         effective_from: datetime | None = None, *, actor: str = "system") -> int:
    """A new price version; never in the past, so a bill already computed never changes."""
    starts = effective_from or datetime.now(UTC)
    if starts.tzinfo is None:
        raise InvalidArgument("the effective date needs a time zone (e.g. 2027-01-01T00:00:00+00:00)")
    if starts < datetime.now(UTC).replace(microsecond=0):
        raise InvalidArgument("a price cannot start in the past: past bills never change")
    input_price = tenancy.dollars_to_microdollars(input_usd_per_1m)
    output_price = tenancy.dollars_to_microdollars(output_usd_per_1m)
    async with tenancy.transaction(db) as conn:
        await tenancy.get_model(conn, model)
        version = await conn.fetchval(SQL_INSERT_PRICE_VERSION, model, starts, input_price, output_price)
        await tenancy.audit(conn, actor, "price.schedule", "model", model,
                            {"price_version_id": version, "effective_from": starts.isoformat(),
                             "input_price_microdollars_per_1m": input_price,
                             "output_price_microdollars_per_1m": output_price})
        return version


async def set_gpu_price(db: Db, gpu_type: str, cloud: str, spot: bool, usd_per_hour: str) -> None:
    await db.execute(SQL_UPSERT_GPU_PRICE, gpu_type, cloud, spot, tenancy.dollars_to_microdollars(usd_per_hour))


SQL_SELECT_PRICES = """
SELECT price_version_id, model_id, effective_from, input_price_microdollars_per_1m,
       output_price_microdollars_per_1m
FROM price_versions WHERE ($1::text IS NULL OR model_id = $1) ORDER BY model_id, effective_from
"""


async def list_prices(db: Db, model: str | None = None) -> list[dict]:
    """Every price version (the current one is the latest that started), '-infinity' as null."""
    rows = await db.fetch(SQL_SELECT_PRICES, model)
    return [{"price_version_id": r["price_version_id"], "model_id": r["model_id"],
             # asyncpg gives -infinity (the catalogue's first version) as a naive datetime.min
             "effective_from": None if r["effective_from"].tzinfo is None else r["effective_from"].isoformat(),
             "input_price_microdollars_per_1m": r["input_price_microdollars_per_1m"],
             "output_price_microdollars_per_1m": r["output_price_microdollars_per_1m"]} for r in rows]
