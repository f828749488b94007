"""Postgres connections and schema migrations (plain numbered SQL files, applied once each)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources

import asyncpg

from crosslogic.runtime.backoff import Backoff

log = logging.getLogger("crosslogic.store")

# What a lost or restarting Postgres raises, as seen under the chaos tests: asyncpg's InternalClientError
# ("cannot switch to state ...; another operation is in progress") comes from a connection broken mid-query.
POSTGRES_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
# Serialises concurrent migrators (several services may start at once).
_MIGRATION_LOCK_ID = 7_271_001


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("crosslogic.store") / "migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), (folder / name).read_text()) for name in names]


async def migrate(database_url: str) -> list[str]:
    """Apply every migration not yet applied; returns the versions applied now."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
        try:
            await conn.execute(_MIGRATIONS_TABLE)
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, sql in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)
    finally:
        await conn.close()


@asynccontextmanager
async def open_pool(database_url: str, *, min_size: int = 1, max_size: int = 8) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size)
    try:
        yield pool
    finally:
        await pool.close()


async def follow_notifications(database_url: str, channels: Sequence[str],
                               on_notify: Callable[[str, str], None], on_connected: Callable[[], None],
                               what: str, on_lost: Callable[[], None] | None = None) -> None:
    """LISTEN on `channels` until cancelled, calling on_notify(channel, payload) for each NOTIFY.

    Reconnects when Postgres goes away: the loss is seen at once (termination listener), and reconnect
    attempts start 0.1 s apart, doubling to 2 s, so the feed is back within moments of Postgres.
    `on_connected` runs after every (re)connect, since changes made while nobody listened were missed;
    `on_lost` when the feed breaks.
    """
    backoff = Backoff(initial_s=0.1, maximum_s=2.0)
    failures = 0
    while True:
        try:
            conn = await asyncpg.connect(database_url)
            try:
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                for channel in channels:
                    await conn.add_listener(channel, lambda _conn, _pid, chan, payload: on_notify(chan, payload))
                on_connected()
                failures = 0
                while not conn.is_closed():
                    with contextlib.suppress(TimeoutError):  # the poll is only the backstop of the listener
                        await asyncio.wait_for(lost.wait(), 1.0)
            finally:
                await conn.close()
            raise ConnectionError("the connection was closed")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            failures += 1
            log.warning("%s unavailable (%s); retrying", what, exc)
            if on_lost is not None:
                on_lost()
            await asyncio.sleep(backoff.delay(failures))
