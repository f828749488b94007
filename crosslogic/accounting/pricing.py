"""Token prices in integer micro-dollars: no floats ever touch money. Pure functions, property-tested."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

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
