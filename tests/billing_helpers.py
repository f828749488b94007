"""A local Stripe-compatible server on a free port, for tests that drive the real `stripe` SDK."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from crosslogic.accounting.stripe_local import LocalStripe
from crosslogic.runtime.processes import free_port

API_KEY = "sk_test_crosslogic"


@asynccontextmanager
async def local_stripe() -> AsyncIterator[tuple[LocalStripe, str]]:
    fake = LocalStripe()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def priced_catalogue(conn, org_ids, models=(("llama-3-8b", 50_000, 80_000),), regions=(("ap-south", 1_000_000),)):
    """The rows a ledger needs to price usage: models, regions and orgs (each with its first versions)."""
    for model, input_price, output_price in models:
        await conn.execute("INSERT INTO models (model_id, input_price_microdollars_per_1m, "
                           "output_price_microdollars_per_1m) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                           model, input_price, output_price)
    for region, multiplier in regions:
        await conn.execute("INSERT INTO regions (region_id, display_name, price_multiplier_ppm) VALUES ($1, $1, $2) "
                           "ON CONFLICT DO NOTHING", region, multiplier)
    for org_id in org_ids:
        await conn.execute("INSERT INTO orgs (org_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                           uuid.UUID(str(org_id)), f"org-{org_id}")
