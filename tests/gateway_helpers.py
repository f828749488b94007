"""Helpers for tests that drive the real gateway."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings

import asyncpg
import openai

LEDGER_WAIT_S = 15.0


async def ledger_row(database_url: str, request_id: str) -> asyncpg.Record:
    """The ledger row of one request, waiting for the access-log flush (never a timing assertion)."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + LEDGER_WAIT_S
        while True:
            row = await conn.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id)
            if row is not None or time.monotonic() > deadline:
                assert row is not None, f"no ledger row for request {request_id}"
                return row
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


# No request in these tests takes more than a few seconds; a hang fails fast instead of after the SDK's 600 s.
CLIENT_TIMEOUT_S = 60.0

# Clients handed out by `client()` and not closed yet; conftest's autouse `_close_test_clients` closes them when
# the test ends. A client must never be left to the garbage collector: when the cyclic GC finalises one with an
# idle keep-alive connection, asyncio's transport __del__ closes the socket at once (freeing its fd number), and
# openai's __del__ resurrects the client to close its pool from a task that runs later. By then a new connection
# may hold that fd number; the old transport's abort() then removes the NEW connection's reader from the event
# loop (CPython gh-130141), and that request's response sits unread in the kernel until the client times out.
# That was the "rare request hang" (docs/architecture.md, "Test clients").
_open_clients: list[openai.AsyncOpenAI] = []


def client(gateway: dict, api_key: str | None = None, **kwargs) -> openai.AsyncOpenAI:
    """An openai client for the gateway, closed automatically when the calling test ends."""
    kwargs.setdefault("timeout", CLIENT_TIMEOUT_S)
    api = openai.AsyncOpenAI(base_url=gateway["gateway_url"], api_key=api_key or gateway["api_key"],
                             max_retries=0, **kwargs)
    _open_clients.append(api)
    return api


async def close_clients() -> None:
    """Closes every client `client()` handed out and nobody closed yet (their connections with them)."""
    while _open_clients:
        await _open_clients.pop().close()


def connections_left_to_the_garbage_collector() -> list[str]:
    """Collects garbage and returns asyncio's "unclosed transport" warnings: connections someone left for the
    garbage collector to close (the precondition of the hang above).

    Call it with no event loop running: openai's __del__ then cannot schedule its late close, so nothing is
    resurrected and the collection itself is harmless.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("collect outside the event loop: inside it, a finalised client schedules its late close")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(w.message) for w in caught
            if issubclass(w.category, ResourceWarning) and str(w.message).startswith("unclosed transport")]


def child_pids(parent_pid: int, needle: str) -> list[int]:
    """Processes started by `parent_pid` (e.g. `crosslogic up`) whose command line contains `needle`."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent_pid and needle in cmdline:
            found.append(int(entry))
    return found


async def ledger_rows(database_url: str, request_ids: list[str], wait_s: float = 60.0) -> dict[str, asyncpg.Record]:
    """Ledger rows of many requests, polling until all are there or the deadline passes."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            rows = await conn.fetch("SELECT * FROM usage_records WHERE request_id = ANY($1::text[])", request_ids)
            if len(rows) == len(set(request_ids)) or time.monotonic() > deadline:
                return {r["request_id"]: r for r in rows}
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
