"""Shared fixtures: real Postgres (embedded, or CROSSLOGIC_DATABASE_URL) with the schema applied."""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, settings

from crosslogic.runtime.postgres import EmbeddedPostgres
from crosslogic.store.db import migrate
from tests.gateway_helpers import close_clients, connections_left_to_the_garbage_collector

# Hypothesis profiles, picked with HYPOTHESIS_PROFILE (default "ci", what `make test` runs). Every profile has
# no per-example deadline: on a shared 2-core box a slow example is load, not a bug, and 200 ms deadlines made
# property tests flaky. "ci" is derandomized and keeps no example database, so a run is reproducible and two
# runs of the same commit try the same examples; "dev" explores new random examples each run (and remembers
# failures in .hypothesis/); "thorough" runs ten times as many.
_NO_DEADLINE = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, print_blob=True, **_NO_DEADLINE)
settings.register_profile("dev", max_examples=100, **_NO_DEADLINE)
settings.register_profile("thorough", max_examples=1_000, **_NO_DEADLINE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("CROSSLOGIC_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg")).start()
    try:
        yield server.url
    finally:
        server.stop()


async def _create_database(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = server_url.rpartition("/")
    url = f"{base}/{name}"
    await migrate(url)
    return url


@pytest.fixture
def database_url(postgres_server_url: str) -> str:
    """A fresh, migrated database per test: tests never see each other's rows."""
    name = "t_" + uuid.uuid4().hex[:12]
    return asyncio.run(_create_database(postgres_server_url, name))


def pytest_collection_finish(session: pytest.Session) -> None:
    # What exists once the tests are collected (modules, protobuf descriptors, ...) lives for the whole run:
    # exempt it from the full collection the guard below runs after every test (~3 ms instead of ~65 ms each).
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _no_connection_left_to_the_garbage_collector() -> Iterator[None]:
    """Fails a test that leaves an open connection for the garbage collector to close.

    Such a connection made other tests' requests hang until the client timeout, at random (see
    tests/gateway_helpers.py `_open_clients`); this makes the culprit fail at once instead. Torn down after
    `_close_test_clients`, outside the event loop.
    """
    yield
    left = connections_left_to_the_garbage_collector()
    if left:
        pytest.fail(f"this test left {len(left)} open connection(s) to the garbage collector: close every client "
                    f"it opens (tests/gateway_helpers.py client() does it for you): {left[:3]}", pytrace=False)


@pytest.fixture(autouse=True)
async def _close_test_clients(_no_connection_left_to_the_garbage_collector) -> AsyncIterator[None]:
    """Closes the openai clients the test got from tests/gateway_helpers.py `client()`."""
    yield
    await close_clients()


@pytest.fixture
def key_secret() -> str:
    return "test-secret-" + uuid.uuid4().hex


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@contextmanager
def up_demo(state: Path, *, crosslogic: list[str] | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None, log_path: Path | None = None,
            up_args: tuple[str, ...] = ()) -> Iterator[dict]:
    """`crosslogic up --demo` on `state` (by default this checkout's, run from it) until the block ends; yields
    the ready file's details and `state_dir`. Its output goes to `log_path` (default `<state>/up.log`)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from crosslogic.runtime.processes import free_port

    ready = state / "ready.json"
    log_path = log_path or state / "up.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed at the end of the block
    proc = subprocess.Popen(
        [*(crosslogic or [sys.executable, "-m", "crosslogic"]), "--state-dir", str(state), "up", "--demo",
         "--port", str(free_port()), "--ready-file", str(ready), *up_args],
        stdout=log, stderr=subprocess.STDOUT, cwd=cwd or repo_root(), env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("crosslogic up did not become ready:\n" + log_path.read_text()[-4000:])
            time.sleep(0.1)
        yield {**json.loads(ready.read_text()), "state_dir": str(state)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run_stack(tmp_path_factory: pytest.TempPathFactory, admission: str, transport: str,
               env: dict[str, str] | None = None) -> Iterator[dict]:
    """`crosslogic up --demo` with CROSSLOGIC_ADMISSION=`admission`, CROSSLOGIC_AUTHZ_TRANSPORT=`transport` (and
    `env`), until the session ends (or pytest moves on to the other transport)."""
    with up_demo(tmp_path_factory.mktemp(f"stack-{transport}"),
                 env={**os.environ, "CROSSLOGIC_ADMISSION": admission, "CROSSLOGIC_AUTHZ_TRANSPORT": transport,
                      **(env or {})}) as info:
        yield info


# Every test on a gateway stack runs once per ext_authz transport: HTTP (the default) and the standard gRPC
# service, which stays supported. Pytest groups the tests by transport, so each stack starts once per transport.
# CROSSLOGIC_TEST_TRANSPORTS=http (or grpc) narrows it, e.g. while working on one of them.
AUTHZ_TRANSPORTS = tuple(os.environ.get("CROSSLOGIC_TEST_TRANSPORTS", "http,grpc").split(","))


@pytest.fixture(scope="session", params=AUTHZ_TRANSPORTS)
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The whole stack as a user runs it: `crosslogic up --demo` (real Envoy, Postgres, Valkey, simulators);
    rate-limit admission inside ext_authz (the default)."""
    yield from _run_stack(tmp_path_factory, "authz", request.param)


@pytest.fixture(scope="session", params=AUTHZ_TRANSPORTS)
def rls_gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The same stack with admission "rls": Envoy's ratelimit filter calls `crosslogic serve ratelimit`, with
    descriptors built from ext_authz's metadata (strings over either transport)."""
    yield from _run_stack(tmp_path_factory, "rls", request.param)


# Client bounds short enough to watch them act (tests/test_edges.py); the defaults are the same code with
# longer values.
TIGHT_BOUNDS = {"CROSSLOGIC_REQUEST_HEADERS_TIMEOUT": "1", "CROSSLOGIC_REQUEST_TIMEOUT": "2",
                "CROSSLOGIC_CONNECTION_IDLE_TIMEOUT": "2", "CROSSLOGIC_UPSTREAM_IDLE_TIMEOUT": "2",
                "CROSSLOGIC_ABUSE_FAILURE_BURST": "10", "CROSSLOGIC_ABUSE_FAILURE_REFILL": "0.5"}


@pytest.fixture(scope="session", params=AUTHZ_TRANSPORTS)
def tight_gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The demo stack with short client timeouts, a 2 s node-silence bound and a small failure budget."""
    yield from _run_stack(tmp_path_factory, "authz", request.param, TIGHT_BOUNDS)


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Valkey for limiter tests (the gateway stack runs its own)."""
    from crosslogic.runtime.valkey import EmbeddedValkey

    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey")).start()
    try:
        yield server.url
    finally:
        server.stop()
