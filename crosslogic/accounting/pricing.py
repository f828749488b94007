"""Token prices in integer micro-dollars: no floats ever touch money. Pure functions, property-tested.

The ledger prices rows in SQL (migration 007's `crosslogic_cost`, the same formula); `PriceBook` is the
in-memory copy of the version tables that ext_authz prices bill-cap reservations with.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

PPM = 1_000_000  # multipliers are parts per million: 1.2x = 1_200_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens


@dataclass(frozen=True)
class ModelPrice:
    input_microdollars_per_1m: int
    output_microdollars_per_1m: int
    version_id: int | None = None


@dataclass(frozen=True)
class PriceVersion:
    effective_from: datetime
    price: ModelPrice


@dataclass(frozen=True)
class OrgTerms:
    """What an org's contract changes about a price: its tier's multiplier and its discount."""

    tier_multiplier_ppm: int = PPM
    discount_ppm: int = 0  # 150_000 = 15% off


def cost_microdollars(prompt_tokens: int, completion_tokens: int, price: ModelPrice,
                      region_multiplier_ppm: int = PPM, terms: OrgTerms | None = None) -> int:
    """Exact cost, rounded half up once at the end (never per part, so splits cannot shave cents)."""
    terms = terms or OrgTerms()
    numerator = ((prompt_tokens * price.input_microdollars_per_1m
                  + completion_tokens * price.output_microdollars_per_1m)
                 * region_multiplier_ppm * terms.tier_multiplier_ppm * (PPM - terms.discount_ppm))
    denominator = TOKENS_PER_PRICE_UNIT * PPM * PPM * PPM
    return (numerator + denominator // 2) // denominator


def effective_at(versions: Sequence[tuple[datetime, object]], at: datetime) -> object | None:
    """The value of the latest version starting at or before `at` (versions sorted by start)."""
    index = bisect.bisect_right([start for start, _ in versions], at) - 1
    return versions[index][1] if index >= 0 else None


@dataclass(frozen=True)
class Versions:
    """One model's (region's, org's) versions, sorted by start; `at` is what was in effect then."""

    starts: tuple[datetime, ...]
    values: tuple[object, ...]

    def at(self, moment: datetime) -> object | None:
        index = bisect.bisect_right(self.starts, moment) - 1
        return self.values[index] if index >= 0 else None


def _start(value: datetime) -> datetime:
    """asyncpg gives -infinity as datetime.min (naive): make every start comparable with aware times."""
    return value if value.tzinfo else datetime.min.replace(tzinfo=UTC)


def _versions(rows: Sequence[tuple[str, datetime, object]]) -> dict[str, Versions]:
    grouped: dict[str, list[tuple[datetime, object]]] = {}
    for key, start, value in rows:
        grouped.setdefault(key, []).append((_start(start), value))
    out = {}
    for key, items in grouped.items():
        items.sort(key=lambda item: item[0])
        out[key] = Versions(tuple(s for s, _ in items), tuple(v for _, v in items))
    return out


_PRICES_SQL = """
SELECT model_id, effective_from, price_version_id, input_price_microdollars_per_1m AS i,
       output_price_microdollars_per_1m AS o
FROM price_versions
"""
_REGIONS_SQL = "SELECT region_id, effective_from, multiplier_ppm FROM region_multiplier_versions"
_TERMS_SQL = """
SELECT org_id::text AS org_id, effective_from, tier_multiplier_ppm, discount_ppm FROM org_terms_versions
WHERE $1::uuid[] IS NULL OR org_id = ANY($1::uuid[])
"""


async def price_rows(conn: asyncpg.Connection | asyncpg.Pool,
                     org_ids: Sequence[str] | None = None) -> dict[str, list[tuple]]:
    """The version tables as plain tuples: models (id, start, version, in, out), regions (id, start, ppm), org
    terms (org, start, tier ppm, discount ppm) of `org_ids` only (None: every org)."""
    ids = None if org_ids is None else list(org_ids)
    return {"models": [(r["model_id"], r["effective_from"], r["price_version_id"], r["i"], r["o"])
                       for r in await conn.fetch(_PRICES_SQL)],
            "regions": [(r["region_id"], r["effective_from"], r["multiplier_ppm"])
                        for r in await conn.fetch(_REGIONS_SQL)],
            "terms": [(r["org_id"], r["effective_from"], r["tier_multiplier_ppm"], r["discount_ppm"])
                      for r in await conn.fetch(_TERMS_SQL, ids)]}


@dataclass
class PriceBook:
    """The version tables in memory: a cost at any moment, or None when a version is missing (never a default)."""

    models: dict[str, Versions] = field(default_factory=dict)
    regions: dict[str, Versions] = field(default_factory=dict)
    orgs: dict[str, Versions] = field(default_factory=dict)

    @classmethod
    async def load(cls, conn: asyncpg.Connection | asyncpg.Pool, org_ids: Sequence[str] | None = None) -> PriceBook:
        """Every price and region version; org terms of `org_ids` only (None: every org)."""
        return cls.from_rows(await price_rows(conn, org_ids))

    @classmethod
    def from_rows(cls, rows: Mapping[str, Sequence[Sequence]]) -> PriceBook:
        """A book from `price_rows` (also as a site receives them in its sync)."""
        return cls(_versions([(m, s, ModelPrice(i, o, v)) for m, s, v, i, o in rows["models"]]),
                   _versions([(r, s, ppm) for r, s, ppm in rows["regions"]]),
                   _versions([(org, s, OrgTerms(t, d)) for org, s, t, d in rows["terms"]]))

    def cost(self, at: datetime, org_id: str, model: str, region: str, prompt_tokens: int,
             completion_tokens: int) -> int | None:
        """What the ledger would charge for this usage at `at`; None if a price, multiplier or terms is unknown."""
        versions = (self.models.get(model), self.regions.get(region), self.orgs.get(org_id))
        if any(v is None for v in versions):
            return None
        price, multiplier, terms = (v.at(at) for v in versions)  # type: ignore[union-attr]
        if price is None or multiplier is None or terms is None:
            return None
        return cost_microdollars(prompt_tokens, completion_tokens, price, multiplier, terms)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Allocation:
    free_tokens: int
    billable_microdollars: int


def allocate_allowance(usages: Sequence[tuple[int, int]], allowance_tokens: int) -> list[Allocation]:
    """Spend a token allowance (monthly free tier, or reserved capacity) on usages in order.

    `usages` = (tokens, cost) in the order they happened. A usage fully inside the allowance costs 0; the
    one that crosses it pays for its tokens beyond, pro rata, rounded half up; later ones pay in full.
    """
    remaining = max(0, allowance_tokens)
    out = []
    for tokens, cost in usages:
        free = min(tokens, remaining)
        remaining -= free
        if free == 0:
            billable = cost
        elif free == tokens:
            billable = 0
        else:
            billable = (cost * (tokens - free) * 2 + tokens) // (2 * tokens)
        out.append(Allocation(free, billable))
    return out
