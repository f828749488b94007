"""The routing policy table (per region, '*' the default): read, set, reset, for `crosslogic policy` and the admin
API. A change is checked with the xDS server's own validation first (crosslogic.xds.policy.validate), so a bad
edit is refused with the reason instead of being written and then rejected; each change is audited."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from crosslogic.store.tenancy import Db, InvalidArgument, NotFound, audit, transaction
from crosslogic.xds.policy import SQL_POLICY, SQL_REGIONS, PolicyRejected, validate

SQL_UPSERT = """
INSERT INTO routing_policy (region, pinning, spill_share, retries, score_weights, queue_capacity, load_aware,
    updated_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, now())
ON CONFLICT (region) DO UPDATE SET pinning = $2, spill_share = $3, retries = $4, score_weights = $5::jsonb,
    queue_capacity = $6, load_aware = $7, updated_at = now()
"""
SQL_DELETE = "DELETE FROM routing_policy WHERE region = $1 AND region <> '*'"
SQL_STATUS = "SELECT accepted, message, checked_at FROM routing_policy_status"
FIELDS = ("pinning", "spill_share", "retries", "score_weights", "queue_capacity", "load_aware")


def _rows(records: list[Any]) -> list[dict]:
    rows = []
    for record in records:
        row = dict(record)
        if isinstance(row["score_weights"], str):
            row["score_weights"] = json.loads(row["score_weights"])
        rows.append(row)
    return sorted(rows, key=lambda r: r["region"])


async def read_policy(db: Db) -> tuple[list[dict], dict | None]:
    """Every region's row, and the xDS server's last validation result (None before its first check)."""
    status = await db.fetchrow(SQL_STATUS)
    return _rows(await db.fetch(SQL_POLICY)), (dict(status) if status else None)


async def set_policy(db: Db, region: str, changes: Mapping[str, Any], *, actor: str = "system") -> dict:
    """Create or change one region's row (unset fields from its current row, else from '*'); raises
    InvalidArgument (with every problem) when the whole policy would not validate."""
    unknown = set(changes) - set(FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown routing policy fields: {', '.join(sorted(unknown))}")
    async with transaction(db) as conn:
        rows = {r["region"]: r for r in _rows(await conn.fetch(SQL_POLICY))}
        row = dict(rows.get(region) or rows["*"], region=region)
        row.update({k: v for k, v in changes.items() if v is not None})
        rows[region] = row
        regions = {r["region_id"]: tuple(r["fallback_chain"]) for r in await conn.fetch(SQL_REGIONS)}
        try:
            validate(list(rows.values()), regions)
        except PolicyRejected as exc:
            raise InvalidArgument(f"refused, nothing written: {exc}") from None
        await conn.execute(SQL_UPSERT, region, *(json.dumps(row[n]) if n == "score_weights" else row[n]
                                                 for n in FIELDS))
        await audit(conn, actor, "policy.set", "routing_policy", region, {n: row[n] for n in FIELDS})
        return row


async def reset_policy(db: Db, region: str, *, actor: str = "system") -> None:
    if region == "*":
        raise InvalidArgument("the '*' default cannot be removed; set it instead")
    async with transaction(db) as conn:
        if await conn.execute(SQL_DELETE, region) == "DELETE 0":
            raise NotFound(f"no routing policy for region {region!r}")
        await audit(conn, actor, "policy.reset", "routing_policy", region, {})
