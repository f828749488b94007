"""Token prices in integer micro-dollars: no floats ever touch money."""

from __future__ import annotations

from dataclasses import dataclass

PPM = 1_000_000  # multipliers are parts per million: 1.2x = 1_200_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens


@dataclass(frozen=True)
class ModelPrice:
    input_microdollars_per_1m: int
    output_microdollars_per_1m: int


def cost_microdollars(prompt_tokens: int, completion_tokens: int, price: ModelPrice,
                      region_multiplier_ppm: int = PPM) -> int:
    """Exact cost, rounded half up once at the end (never per part, so splits cannot shave cents)."""
    numerator = (prompt_tokens * price.input_microdollars_per_1m
                 + completion_tokens * price.output_microdollars_per_1m) * region_multiplier_ppm
    denominator = TOKENS_PER_PRICE_UNIT * PPM
    return (numerator + denominator // 2) // denominator
