"""Postgres connections and schema migrations (plain numbered SQL files, applied once each)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources

import asyncpg

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

    Reconnects when Postgres goes away. `on_connected` runs after every (re)connect, since changes made
    while nobody listened were missed; `on_lost` when the feed breaks.
    """
    while True:
        try:
            conn = await asyncpg.connect(database_url)
            try:
                for channel in channels:
                    await conn.add_listener(channel, lambda _conn, _pid, chan, payload: on_notify(chan, payload))
                on_connected()
                while not conn.is_closed():  # noqa: ASYNC110 - asyncpg offers no close event to await
                    await asyncio.sleep(1.0)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("%s unavailable (%s); retrying", what, exc)
            if on_lost is not None:
                on_lost()
            await asyncio.sleep(1.0)
