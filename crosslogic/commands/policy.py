"""`crosslogic policy show|set|reset`: edit the routing policy; the same validation as the xDS process runs
first, so a bad edit is refused here with the reason instead of being written and then rejected."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import asyncpg

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


def _rows(records: list[asyncpg.Record]) -> list[dict]:
    rows = []
    for record in records:
        row = dict(record)
        if isinstance(row["score_weights"], str):
            row["score_weights"] = json.loads(row["score_weights"])
        rows.append(row)
    return rows


async def _connect(args: argparse.Namespace) -> asyncpg.Connection:
    from crosslogic.runtime.state import resolve_settings

    return await asyncpg.connect(resolve_settings(args.state_dir).require_database())


async def _show(args: argparse.Namespace) -> int:
    conn = await _connect(args)
    try:
        rows = _rows(await conn.fetch(SQL_POLICY))
        status = await conn.fetchrow(SQL_STATUS)
    finally:
        await conn.close()
    for row in sorted(rows, key=lambda r: r["region"]):
        print(json.dumps(row, default=str))
    if status:
        print(f"last check: {'accepted' if status['accepted'] else 'REJECTED'}: {status['message']}")
    return 0


async def _set(args: argparse.Namespace) -> int:
    conn = await _connect(args)
    try:
        rows = {r["region"]: r for r in _rows(await conn.fetch(SQL_POLICY))}
        row = dict(rows.get(args.region) or rows["*"], region=args.region)
        for name in FIELDS:
            value = getattr(args, name)
            if value is not None:
                row[name] = json.loads(value) if name == "score_weights" else value
        rows[args.region] = row
        regions = {r["region_id"]: tuple(r["fallback_chain"]) for r in await conn.fetch(SQL_REGIONS)}
        try:
            validate(list(rows.values()), regions)
        except PolicyRejected as exc:
            print(f"crosslogic policy: refused, nothing written: {exc}", file=sys.stderr)
            return 2
        await conn.execute(SQL_UPSERT, args.region, *(json.dumps(row[n]) if n == "score_weights" else row[n]
                                                      for n in FIELDS))
    finally:
        await conn.close()
    print(f"routing policy for {args.region} saved; every Envoy follows within a second")
    return 0


async def _reset(args: argparse.Namespace) -> int:
    conn = await _connect(args)
    try:
        await conn.execute(SQL_DELETE, args.region)
    finally:
        await conn.close()
    print(f"routing policy for {args.region} removed (the '*' default applies)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="routing policy: pinning, spill share, retries, scorer weights")
    psub = p.add_subparsers(dest="policy_command", required=True)
    show = psub.add_parser("show", help="every region's policy and the last validation result")
    show.set_defaults(handler=lambda a: asyncio.run(_show(a)))
    put = psub.add_parser("set", help="create or change one region's policy ('*' = the default)")
    put.add_argument("region", help="region id, or '*' for the default")
    put.add_argument("--pinning", choices=["strict", "fallback"],
                     help="strict: never leave the region; fallback: spill along its fallback chain")
    put.add_argument("--spill-share", type=float, help="0..1: share of traffic allowed into fallback regions")
    put.add_argument("--retries", type=int, help="retries on another node before the client sees an error")
    put.add_argument("--score-weights", help='JSON, e.g. {"queue": 0.5, "kv_cache": 0.3, "throughput": 0.2}')
    put.add_argument("--queue-capacity", type=int, help="queued requests per node counted as full load")
    put.add_argument("--load-aware", action=argparse.BooleanOptionalAction, default=None,
                     help="weights from live node load (else equal weights)")
    put.set_defaults(handler=lambda a: asyncio.run(_set(a)))
    reset = psub.add_parser("reset", help="remove one region's policy")
    reset.add_argument("region", help="region id")
    reset.set_defaults(handler=lambda a: asyncio.run(_reset(a)))
