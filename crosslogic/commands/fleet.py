"""`crosslogic fleet policy show|set|remove` and `crosslogic fleet machines`: the autoscaler's policy per
(region, model) pool, validated exactly as every autoscaler replica validates it before writing; every change
audited."""

from __future__ import annotations

import argparse
import json
from typing import Any

from crosslogic.commands.common import Ctx, Output, db_command, table
from crosslogic.fleet.policy import POLICY_FIELDS, FleetPolicyRejected, defaults, validate
from crosslogic.store import tenancy as t

SQL_ONE = "SELECT * FROM fleet_policy WHERE region = $1 AND model = $2"
SQL_ALL = """
SELECT p.*, s.accepted, s.message FROM fleet_policy p
LEFT JOIN fleet_policy_status s USING (region, model) ORDER BY region, model
"""
SQL_CAPACITY = "SELECT tokens_per_sec FROM models WHERE model_id = $1"
SQL_UPSERT = f"""
INSERT INTO fleet_policy (region, model, {", ".join(POLICY_FIELDS)}, updated_at)
VALUES ($1, $2, {", ".join(f"${i + 3}" for i in range(len(POLICY_FIELDS)))}, now())
ON CONFLICT (region, model) DO UPDATE SET {", ".join(f"{f} = EXCLUDED.{f}" for f in POLICY_FIELDS)}, updated_at = now()
"""
SQL_DELETE = "DELETE FROM fleet_policy WHERE region = $1 AND model = $2"
SQL_MACHINES = """
SELECT m.name, m.region, m.model, m.provider, m.state, coalesce(n.status, '-') AS node_status, m.spot, m.gpu_type,
       m.price_microdollars_per_hour, m.reason, m.replaces, m.launched_at
FROM fleet_machines m LEFT JOIN nodes n USING (name)
WHERE ($1::text IS NULL OR m.region = $1) AND ($2 OR m.state <> 'terminated')
ORDER BY m.launched_at
"""
# CLI flag -> column; every one optional on `set` (unset = keep the current value or the default).
FLAGS: dict[str, tuple[str, type, str]] = {
    "min_nodes": ("--min-nodes", int, "fewest nodes (default 1)"),
    "max_nodes": ("--max-nodes", int, "most nodes (default 4)"),
    "reserved_tokens_per_sec": ("--reserved-tokens-per-sec", int, "reserved CUs sold in the pool: a floor of nodes"),
    "target_load": ("--target-load", float, "wanted mean node load, 0.05..1 (default 0.7)"),
    "queue_capacity": ("--queue-capacity", int, "waiting requests per node counted as full load (default 4)"),
    "scale_up_after_s": ("--scale-up-after", float, "seconds of pressure before scaling up (default 30)"),
    "scale_down_after_s": ("--scale-down-after", float, "seconds of calm before draining a node (default 300)"),
    "cooldown_s": ("--cooldown", float, "seconds after a scaling action before the next (default 120)"),
    "register_deadline_s": ("--register-deadline", float, "a launch not registered by then is replaced (900)"),
    "retry_base_s": ("--retry-base", float, "first retry delay after a failed launch, doubling (default 30)"),
    "node_tokens_per_sec": ("--node-tokens-per-sec", int, "one node's capacity (0 = the model's tokens/s)"),
    "cloud": ("--cloud", str, "cloud for new nodes (default aws)"),
    "cloud_region": ("--cloud-region", str, "the cloud's region name, e.g. ap-south-1 ('' = provider picks)"),
    "gpu_type": ("--gpu-type", str, "GPU model recorded for FinOps (default L4)"),
    "accelerators": ("--accelerators", str, "SkyPilot accelerators, e.g. L4:1, A100-80GB:8"),
    "engine": ("--engine", str, "vllm or sglang"),
}
COLUMNS = [("POOL", lambda r: f"{r['region']}/{r['model']}"), ("MIN", lambda r: r["min_nodes"]),
           ("MAX", lambda r: r["max_nodes"]), ("RESERVED_TPS", lambda r: r["reserved_tokens_per_sec"]),
           ("TARGET", lambda r: r["target_load"]), ("SPOT", lambda r: r["spot"]),
           ("FALLBACK", lambda r: r["on_demand_fallback"]), ("ACCEL", lambda r: r["accelerators"]),
           ("ENGINE", lambda r: r["engine"]), ("CHECK", lambda r: r.get("message") or "not checked yet")]


def _plain(row: Any) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(row).items()}


async def _show(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    rows = [_plain(r) for r in await db.fetch(SQL_ALL)]
    return Output(rows, table(rows, COLUMNS))


async def _set(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    current = await db.fetchrow(SQL_ONE, a.region, a.model)
    row = dict(current) if current is not None else defaults(a.region, a.model)
    for name in FLAGS:
        value = getattr(a, name)
        if value is not None:
            row[name] = value
    for name in ("spot", "on_demand_fallback"):
        if getattr(a, name) is not None:
            row[name] = getattr(a, name)
    await t.require_regions(db, [a.region])
    await t.require_models(db, [a.model])
    try:
        policy = validate(row, float(await db.fetchval(SQL_CAPACITY, a.model) or 0))
    except FleetPolicyRejected as exc:
        raise t.InvalidArgument(f"fleet policy refused, nothing written: {exc}") from None
    async with db.transaction():
        await db.execute(SQL_UPSERT, a.region, a.model, *(getattr(policy, f) for f in POLICY_FIELDS))
        await t.audit(db, c.actor, "fleet.policy_set", "fleet_pool", f"{a.region}/{a.model}",
                      {f: getattr(policy, f) for f in POLICY_FIELDS})
    saved = _plain(await db.fetchrow(SQL_ONE, a.region, a.model))
    return Output(saved, f"fleet policy for {a.region}/{a.model} saved; the autoscaler follows at its next tick\n"
                         + table([saved], COLUMNS[:-1]))


async def _remove(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    async with db.transaction():
        gone = await db.execute(SQL_DELETE, a.region, a.model)
        await t.audit(db, c.actor, "fleet.policy_remove", "fleet_pool", f"{a.region}/{a.model}", {})
    if gone == "DELETE 0":
        raise t.NotFound(f"no fleet policy for {a.region}/{a.model}")
    return Output({"removed": f"{a.region}/{a.model}"},
                  f"fleet policy for {a.region}/{a.model} removed: the autoscaler leaves the pool's nodes alone")


async def _machines(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    rows = [_plain(r) for r in await db.fetch(SQL_MACHINES, a.region, a.all)]
    columns = [("NAME", lambda r: r["name"]), ("POOL", lambda r: f"{r['region']}/{r['model']}"),
               ("PROVIDER", lambda r: r["provider"]), ("MACHINE", lambda r: r["state"]),
               ("NODE", lambda r: r["node_status"]), ("SPOT", lambda r: r["spot"]),
               ("USD/H", lambda r: f"{r['price_microdollars_per_hour'] / 1e6:.4f}"), ("REASON", lambda r: r["reason"])]
    return Output(rows, table(rows, columns))


def register(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="the GPU fleet: autoscaling policy per pool, machines",
                           description="policy rows are read by `crosslogic serve fleet` (docs/fleet.md)")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True)
    policy = fsub.add_parser("policy", help="autoscaling policy per (region, model) pool")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    show = psub.add_parser("show", help="every pool's policy and its last validation by the autoscaler")
    show.set_defaults(handler=db_command(_show))
    put = psub.add_parser("set", help="create or change one pool's policy (validated first)")
    put.add_argument("region", help="region id")
    put.add_argument("model", help="model id")
    for name, (flag, kind, help_text) in FLAGS.items():
        put.add_argument(flag, dest=name, type=kind, help=help_text)
    put.add_argument("--spot", action=argparse.BooleanOptionalAction, default=None,
                     help="launch spot instances (default yes)")
    put.add_argument("--on-demand-fallback", dest="on_demand_fallback", action=argparse.BooleanOptionalAction,
                     default=None, help="launch on-demand when spot capacity is unavailable (default yes)")
    put.set_defaults(handler=db_command(_set))
    rm = psub.add_parser("remove", help="stop managing a pool (its nodes stay)")
    rm.add_argument("region", help="region id")
    rm.add_argument("model", help="model id")
    rm.set_defaults(handler=db_command(_remove))
    machines = fsub.add_parser("machines", help="machines the autoscaler launched, with their lifecycle state")
    machines.add_argument("--region", help="only this region's")
    machines.add_argument("--all", action="store_true", help="include terminated machines")
    machines.set_defaults(handler=db_command(_machines))
    for parser in (show, put, rm, machines):
        parser.add_argument("--actor", help="who is making the change (audit log; default $USER)")


__all__ = ["register", "json"]
