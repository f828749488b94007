"""Regions: list, look up, add / update (fallback chain, price multiplier)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from crosslogic.store.tenancy.common import (
    Db,
    InvalidArgument,
    NotFound,
    audit,
    db_errors,
    fetch_one,
    positive,
    to_json,
    transaction,
    unique,
)


@dataclass(frozen=True)
class Region:
    region_id: str
    display_name: str
    fallback_chain: tuple[str, ...]
    price_multiplier_ppm: int
    status: str
    created_at: datetime


def _region(r: asyncpg.Record) -> Region:
    return Region(
        region_id=r["region_id"],
        display_name=r["display_name"],
        fallback_chain=tuple(r["fallback_chain"]),
        price_multiplier_ppm=r["price_multiplier_ppm"],
        status=r["status"],
        created_at=r["created_at"],
    )


_REGION_COLS = "region_id, display_name, fallback_chain, price_multiplier_ppm, status, created_at"


SQL_SELECT_REGIONS = f"SELECT {_REGION_COLS} FROM regions ORDER BY region_id"


SQL_SELECT_REGION = f"SELECT {_REGION_COLS} FROM regions WHERE region_id = $1"


SQL_UPSERT_REGION = f"""
INSERT INTO regions AS r (region_id, display_name, fallback_chain, price_multiplier_ppm)
VALUES ($1::text, COALESCE($2::text, $1::text), COALESCE($3::text[], '{{}}'), COALESCE($4::int, 1000000))
ON CONFLICT (region_id) DO UPDATE SET
    display_name = COALESCE($2, r.display_name),
    fallback_chain = COALESCE($3::text[], r.fallback_chain),
    price_multiplier_ppm = COALESCE($4, r.price_multiplier_ppm)
RETURNING {_REGION_COLS}"""


async def require_regions(db: Db, regions: Iterable[str | None]) -> None:
    for region in regions:
        if region is not None and await db.fetchrow(SQL_SELECT_REGION, region) is None:
            raise NotFound(f"region {region!r} not found")


async def list_regions(db: Db) -> list[Region]:
    return [_region(r) for r in await db.fetch(SQL_SELECT_REGIONS)]


async def get_region(db: Db, region_id: str) -> Region:
    return _region(await fetch_one(db, f"region {region_id!r} not found", SQL_SELECT_REGION, region_id))


@db_errors
async def add_region(
    db: Db,
    region_id: str,
    display_name: str | None = None,
    fallback_chain: Sequence[str] | None = None,
    price_multiplier_ppm: int | None = None,
    *,
    actor: str = "system",
) -> Region:
    """Create or update a region. Fallback regions may not exist yet (a chain is declared before its
    members are), but a region cannot fall back to itself."""
    if not region_id.strip():
        raise InvalidArgument("region id must be non-empty")
    chain = None if fallback_chain is None else unique(fallback_chain, "fallback chain")
    if chain and region_id in chain:
        raise InvalidArgument(f"region {region_id!r} cannot fall back to itself")
    positive(price_multiplier_ppm, "price multiplier (ppm)")
    async with transaction(db) as conn:
        region = _region(
            await conn.fetchrow(SQL_UPSERT_REGION, region_id, display_name, chain, price_multiplier_ppm)
        )
        await audit(conn, actor, "region.upsert", "region", region.region_id, to_json(region))
        return region
