"""The test suite's own client hygiene: no connection is ever left for the garbage collector to close.

A gateway client finalised by the cyclic GC inside the event loop closes its socket at once but its pool only
later, from a task; when a new connection has reused the fd number meanwhile, asyncio removes that connection's
reader (CPython gh-130141) and its request hangs until the client timeout. See tests/gateway_helpers.py.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager

import openai
from aiohttp import web

from tests.gateway_helpers import client, close_clients, connections_left_to_the_garbage_collector


@asynccontextmanager
async def _stub_gateway() -> AsyncIterator[dict]:
    """Just enough of an OpenAI-compatible server for `models.list()`."""

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield {"gateway_url": f"http://127.0.0.1:{runner.addresses[0][1]}/v1", "api_key": "k"}
    finally:
        await runner.cleanup()


def _left_after(scenario: Callable[[dict], Coroutine]) -> list[str]:
    """Runs `scenario` against a stub gateway in its own loop, then reports the connections it left to the GC.

    (Automatic collection is paused meanwhile, so nothing is collected early, inside the loop.)
    """

    async def run() -> None:
        async with _stub_gateway() as gateway:
            await scenario(gateway)

    gc.collect()
    gc.disable()
    try:
        asyncio.run(run())
        return connections_left_to_the_garbage_collector()
    finally:
        gc.enable()


def test_a_client_dropped_without_closing_is_reported_as_left_to_the_garbage_collector():
    async def drop_it(gateway: dict) -> None:
        api = openai.AsyncOpenAI(base_url=gateway["gateway_url"], api_key="k", max_retries=0)
        await api.models.list()  # leaves one idle keep-alive connection in its pool

    assert len(_left_after(drop_it)) == 1


def test_helper_clients_are_closed_with_their_connections_when_the_test_ends():
    async def use_helper_clients(gateway: dict) -> None:
        first, second = client(gateway), client(gateway)
        await asyncio.gather(first.models.list(), second.models.list(), first.models.list())
        await close_clients()  # what conftest's autouse fixture does once a test ends
        assert first.is_closed() and second.is_closed()

    assert _left_after(use_helper_clients) == []
