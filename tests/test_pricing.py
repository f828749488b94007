"""Money maths: integer micro-dollars, one rounding, properties checked with hypothesis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crosslogic.accounting.pricing import PPM, ModelPrice, cost_microdollars

tokens = st.integers(min_value=0, max_value=10**9)
prices = st.builds(ModelPrice, st.integers(0, 10**9), st.integers(0, 10**9))
multipliers = st.integers(min_value=1, max_value=10 * PPM)


def test_one_million_tokens_cost_exactly_the_listed_price():
    price = ModelPrice(input_microdollars_per_1m=50_000, output_microdollars_per_1m=80_000)
    assert cost_microdollars(1_000_000, 1_000_000, price) == 130_000
    assert cost_microdollars(1_000_000, 0, price, region_multiplier_ppm=1_200_000) == 60_000


@given(tokens, tokens, prices, multipliers)
def test_cost_is_within_half_a_microdollar_of_the_exact_value(prompt, completion, price, multiplier):
    exact_numerator = (prompt * price.input_microdollars_per_1m + completion * price.output_microdollars_per_1m) \
        * multiplier
    cost = cost_microdollars(prompt, completion, price, multiplier)
    assert abs(cost * 10**12 - exact_numerator) <= 10**12 // 2


@given(tokens, tokens, tokens, prices)
def test_more_tokens_never_cost_less(prompt, completion, extra, price):
    assert cost_microdollars(prompt + extra, completion, price) >= cost_microdollars(prompt, completion, price)
    assert cost_microdollars(prompt, completion + extra, price) >= cost_microdollars(prompt, completion, price)


@given(tokens, tokens, prices, multipliers)
def test_cost_is_never_negative_and_zero_tokens_cost_nothing(prompt, completion, price, multiplier):
    assert cost_microdollars(prompt, completion, price, multiplier) >= 0
    assert cost_microdollars(0, 0, price, multiplier) == 0
