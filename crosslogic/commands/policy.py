"""`crosslogic policy show|set|reset`: edit the routing policy; the same validation as the xDS process runs
first, so a bad edit is refused here with the reason instead of being written and then rejected."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import asyncpg

from crosslogic.store import routing_policy as rp
from crosslogic.store.tenancy import InvalidArgument, TenancyError


async def _connect(args: argparse.Namespace) -> asyncpg.Connection:
    from crosslogic.runtime.state import resolve_settings

    return await asyncpg.connect(resolve_settings(args.state_dir).require_database())


def _actor(args: argparse.Namespace) -> str:
    return getattr(args, "actor", None) or os.environ.get("USER") or "cli"


async def _show(args: argparse.Namespace) -> int:
    conn = await _connect(args)
    try:
        rows, status = await rp.read_policy(conn)
    finally:
        await conn.close()
    for row in rows:
        print(json.dumps(row, default=str))
    if status:
        print(f"last check: {'accepted' if status['accepted'] else 'REJECTED'}: {status['message']}")
    return 0


async def _set(args: argparse.Namespace) -> int:
    conn = await _connect(args)
    try:
        changes = {n: getattr(args, n) for n in rp.FIELDS if getattr(args, n) is not None}
        if "score_weights" in changes:
            changes["score_weights"] = json.loads(changes["score_weights"])
        try:
            await rp.set_policy(conn, args.region, changes, actor=_actor(args))
        except InvalidArgument as exc:
            print(f"crosslogic policy: {exc}", file=sys.stderr)
            return 2
    finally:
        await conn.close()
    print(f"routing policy for {args.region} saved; every Envoy follows within a second")
    return 0


async def _reset(args: argparse.Namespace) -> int:
    conn = await _connect(args)
    try:
        await rp.reset_policy(conn, args.region, actor=_actor(args))
    except TenancyError as exc:
        print(f"crosslogic policy: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
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
