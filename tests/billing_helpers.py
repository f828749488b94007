"""A local Stripe-compatible server on a free port, for tests that drive the real `stripe` SDK."""

from __future__ import annotations

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
