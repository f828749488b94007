"""What the database commands share: output as a table or JSON, running one database action with the operator's
settings and audit actor, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from crosslogic.runtime.state import resolve_settings
from crosslogic.store import tenancy as t

# --------------------------------------------------------------- output


@dataclass(frozen=True)
class Output:
    payload: Any  # what --json prints
    text: str  # what a human sees


Column = tuple[str, Callable[[Any], Any]]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, tuple | list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def table(records: Sequence[Any], columns: Sequence[Column]) -> str:
    if not records:
        return "(none)"
    rows = [[h for h, _ in columns]] + [[cell(get(r)) for _, get in columns] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def one(record: Any, columns: Sequence[Column]) -> Output:
    return Output(t.to_json(record), table([record], columns))


def many(records: Sequence[Any], columns: Sequence[Column]) -> Output:
    return Output([t.to_json(r) for r in records], table(records, columns))


def col(name: str, header: str | None = None) -> Column:
    return (header or name.upper(), lambda r: getattr(r, name))


# --------------------------------------------------------------- running a command


@dataclass(frozen=True)
class Ctx:
    actor: str
    secret: bytes | None
    redis_url: str = ""  # for commands that read live limiter state


Action = Callable[[Any, argparse.Namespace, Ctx], Awaitable[Output]]


class DatabaseUnavailable(Exception):
    pass


def fail(message: str, code: int) -> int:
    print(f"crosslogic: error: {message}", file=sys.stderr)
    return code


def db_command(action: Action, *, needs_secret: bool = False) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        state_dir = getattr(args, "state_dir", None)
        settings = resolve_settings(Path(state_dir) if state_dir else None)
        if not settings.database_url:
            return fail("no database: set CROSSLOGIC_DATABASE_URL or start the stack (crosslogic up)", 2)
        secret = settings.key_secret.encode() or None
        if needs_secret and secret is None:
            return fail("no key secret: set CROSSLOGIC_KEY_SECRET or use the stack's --state-dir", 2)
        actor = args.actor or os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
        try:
            out = asyncio.run(run_action(settings.database_url, action, args, Ctx(actor, secret, settings.redis_url)))
        except t.InvalidArgument as e:
            return fail(str(e), 2)
        except t.TenancyError as e:
            return fail(str(e), 1)
        except DatabaseUnavailable as e:
            return fail(str(e), 1)
        if args.json:
            print(json.dumps(out.payload, indent=2, sort_keys=False))
        else:
            print(out.text)
        return 0

    return handler


async def run_action(database_url: str, action: Action, args: argparse.Namespace, ctx: Ctx) -> Output:
    try:
        conn = await asyncpg.connect(database_url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as e:
        raise DatabaseUnavailable(f"cannot connect to the database: {e}") from None
    try:
        return await action(conn, args, ctx)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise DatabaseUnavailable(f"database error: {e}") from None
    finally:
        await conn.close()


def csv_list(value: str) -> list[str]:
    """`--models a,b` and repeated `--models a --models b` both work (with action='extend')."""
    return [v.strip() for v in value.split(",") if v.strip()]
