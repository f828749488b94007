"""Shared by the tenancy data modules: the connection type, operator errors, transactions with their audit row,
argument checks and exact money/multiplier conversions."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ParamSpec, TypeVar

import asyncpg

Db = asyncpg.Connection | asyncpg.Pool | Any  # Any: pool connection proxies are not Connection subclasses


MICRO = 1_000_000  # micro-dollars per dollar, and ppm per 1.0


class TenancyError(Exception):
    """Base of the errors an operator can act on; the CLI prints them without a traceback."""


class NotFound(TenancyError):
    pass


class Conflict(TenancyError):
    pass


class InvalidArgument(TenancyError):
    pass


P = ParamSpec("P")


T = TypeVar("T")


def db_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Constraint violations the explicit checks did not catch still surface as our error types."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except asyncpg.UniqueViolationError as e:
            raise Conflict(f"already exists: {e.detail or e}") from None
        except asyncpg.ForeignKeyViolationError as e:
            raise NotFound(f"referenced row does not exist: {e.detail or e}") from None
        except (asyncpg.CheckViolationError, asyncpg.NotNullViolationError) as e:
            raise InvalidArgument(f"invalid value ({e.constraint_name or e.column_name}): {e}") from None
        except asyncpg.DataError as e:  # out-of-range integers and the like
            raise InvalidArgument(str(e)) from None

    return wrapper


def to_json(record: Any) -> dict[str, Any]:
    """A record as JSON-ready primitives (datetimes as ISO 8601, tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.isoformat()
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in asdict(record).items()}


def optional_id(v: Any) -> str | None:
    return None if v is None else str(v)


SQL_INSERT_AUDIT = """
INSERT INTO audit_log (actor, action, target_type, target_id, details)
VALUES ($1, $2, $3, $4, $5::text::jsonb)"""


@asynccontextmanager
async def transaction(db: Db) -> AsyncIterator[asyncpg.Connection]:
    """One transaction on one connection; inside a caller's transaction this becomes a savepoint."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db


async def audit(conn: Any, actor: str, action: str, target_type: str, target_id: str, details: dict) -> None:
    await conn.execute(
        SQL_INSERT_AUDIT, actor, action, target_type, target_id, json.dumps(details, default=str)
    )


def as_uuid(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except (ValueError, AttributeError, TypeError):
        return None


def choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise InvalidArgument(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def positive(value: int | None, what: str, *, zero_ok: bool = False) -> int | None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise InvalidArgument(f"{what} must be {'>= 0' if zero_ok else '> 0'}, not {value}")
    return value


def exact_units(value: str | int | Decimal, unit: int, what: str) -> int:
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidArgument(f"{what}: {value!r} is not a number") from None
    if not d.is_finite() or d < 0:
        raise InvalidArgument(f"{what}: {value!r} must be a finite, non-negative number")
    scaled = d * unit
    if scaled != scaled.to_integral_value():
        raise InvalidArgument(f"{what}: {value!r} has more precision than 1/{unit:,} allows")
    return int(scaled)


def dollars_to_microdollars(value: str | int | Decimal) -> int:
    """'0.05' (dollars per 1M tokens) -> 50000, exactly; rejects anything finer than one micro-dollar."""
    return exact_units(value, MICRO, "price")


def multiplier_to_ppm(value: str | int | Decimal) -> int:
    """'1.2' -> 1200000 parts per million; rejects zero and anything finer than 1 ppm."""
    ppm = exact_units(value, MICRO, "price multiplier")
    if ppm == 0:
        raise InvalidArgument("price multiplier must be > 0")
    return ppm


def microdollars_to_dollars(micro: int) -> str:
    return format(Decimal(micro) / MICRO, "f")


def ppm_to_multiplier(ppm: int) -> str:
    return format((Decimal(ppm) / MICRO).normalize(), "f")


def unique(items: Iterable[str], what: str) -> list[str]:
    out = [i.strip() for i in items if i.strip()]
    if len(set(out)) != len(out):
        raise InvalidArgument(f"{what} lists an entry twice: {out}")
    return out


async def fetch_one(db: Db, not_found: str, sql: str, *args: Any) -> asyncpg.Record:
    """The one row `sql` finds, or NotFound(not_found)."""
    row = await db.fetchrow(sql, *args)
    if row is None:
        raise NotFound(not_found)
    return row
