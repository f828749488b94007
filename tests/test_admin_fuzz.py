"""Schemathesis against the admin API's own /openapi.json, on a real Postgres: whatever it generates (valid and
invalid parameters and bodies, every route, a platform admin's token), no answer is a 5xx, every answer matches
the document (errors: the OpenAI shape of components/schemas/Error) and has the documented status codes."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from aiohttp import web
from hypothesis import HealthCheck, settings

from crosslogic.api.admin.app import build_admin_app
from crosslogic.api.admin.openapi import openapi_document
from crosslogic.runtime.processes import free_port
from tests.admin_helpers import SECRET, seed
from tests.conftest import _create_database

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
schema = schemathesis.openapi.from_dict(openapi_document())
ignored_auth = schemathesis.checks.ignored_auth
positive_data_acceptance = schemathesis.checks.positive_data_acceptance
EXAMPLES = int(os.environ.get("CROSSLOGIC_FUZZ_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def admin_server(postgres_server_url) -> Iterator[dict]:
    """The admin app on a port of its own, in a thread with its own event loop (schemathesis calls it over HTTP)."""
    database_url = asyncio.run(_create_database(postgres_server_url, "fuzz_" + uuid.uuid4().hex[:10]))
    loop = asyncio.new_event_loop()
    port = free_port()
    started = threading.Event()
    state: dict = {}

    async def start() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            state["world"] = await seed(conn)
        finally:
            await conn.close()
        state["pool"] = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
        runner = state["runner"] = web.AppRunner(build_admin_app(state["pool"], SECRET, "ap-south"))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(60), "the admin app did not start"
    try:
        yield {"base_url": f"http://127.0.0.1:{port}", "token": state["world"].tokens["platform:admin"]}
    finally:
        async def stop() -> None:
            await state["runner"].cleanup()
            await state["pool"].close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_the_admin_api_conforms_to_its_openapi_document(case, admin_server):
    # Left out: ignored_auth (it re-sends a request without schemathesis' own auth, while the token travels in
    # `headers` here; tests/test_admin_api.py holds every route to 401 without a token) and
    # positive_data_acceptance: a schema-valid request may still be refused with a 400 for what no schema says
    # (an expiry in the past, a window of too many buckets, a default max_tokens above the maximum).
    # A negative case may leave the security header out on purpose: then it goes without the token (and gets 401).
    negated = case.operation.schema.is_security_param_negated(case)
    case.call_and_validate(base_url=admin_server["base_url"],
                           headers={} if negated else {"authorization": f"Bearer {admin_server['token']}"},
                           excluded_checks=[ignored_auth, positive_data_acceptance])
