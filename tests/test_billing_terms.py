"""Billing terms from the command line: caps, discounts, future prices (never past ones), GPU prices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import asyncpg

from tests.conftest import repo_root


def _cli(database_url: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CROSSLOGIC_DATABASE_URL": database_url}
    return subprocess.run([sys.executable, "-m", "crosslogic", "billing", *argv], env=env, cwd=repo_root(),
                          capture_output=True, text=True, timeout=60)


async def _seed(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO models (model_id) VALUES ('llama')")
        await conn.execute("INSERT INTO orgs (name) VALUES ('acme')")
    finally:
        await conn.close()


def _commands(database_url: str) -> list[subprocess.CompletedProcess]:
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    earlier = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    return [
        _cli(database_url, "org-terms", "acme", "--cap-usd", "12.5", "--suspend-at-cap", "--discount", "0.15",
             "--free-tokens", "1000", "--stripe-customer", "cus_acme", "--cap-fail-closed"),
        _cli(database_url, "price", "llama", "--input-usd", "0.06", "--output-usd", "0.09", "--from", later),
        _cli(database_url, "price", "llama", "--input-usd", "0.01", "--output-usd", "0.01", "--from", earlier),
        _cli(database_url, "gpu-price", "L4", "aws", "--spot", "--usd-per-hour", "0.36"),
        _cli(database_url, "org-terms", "nobody", "--no-cap"),
    ]


async def test_operators_set_caps_discounts_and_future_prices_but_never_rewrite_past_prices(database_url):
    await _seed(database_url)
    terms, future, past, gpu, missing = _commands(database_url)
    assert terms.returncode == 0, terms.stderr
    assert json.loads(terms.stdout) | {"org_id": None} == {
        "org_id": None, "monthly_bill_cap_microdollars": 12_500_000, "suspend_at_cap": True,
        "free_tokens_per_month": 1000, "discount_ppm": 150_000, "pricing_tier": "standard",
        "stripe_customer_id": "cus_acme", "bill_cap_fail_closed": True}
    assert future.returncode == 0 and past.returncode == 2 and "past" in past.stderr
    assert gpu.returncode == 0 and missing.returncode == 1
    conn = await asyncpg.connect(database_url)
    try:
        versions = await conn.fetch("SELECT effective_from, input_price_microdollars_per_1m FROM price_versions "
                                    "WHERE model_id = 'llama' ORDER BY effective_from")
        assert [v["input_price_microdollars_per_1m"] for v in versions] == [0, 60_000]
        assert await conn.fetchval("SELECT microdollars_per_hour FROM gpu_prices") == 360_000
    finally:
        await conn.close()
