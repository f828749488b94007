"""The fleet's SQL: pool snapshots, claims and the pool memory. Safe with N autoscaler replicas: every decision
for a pool is taken under that pool's transaction-level advisory lock (the others skip it this tick), and every
action is a claim written in the same transaction (a launch is a new machine row, a termination moves a machine
to 'terminating' only if nobody else did), so one need never becomes two launches."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import asyncpg

from crosslogic.fleet.decide import NodeState, PoolMemory

LOCK_CLASS = 7_271_009  # pg_advisory_xact_lock(LOCK_CLASS, hashtext(region/model))
# A claim to terminate left by a replica that died: taken over after this long.
STALE_CLAIM_S = 600

SQL_TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1, hashtext($2 || '/' || $3))"
SQL_LOCK = "SELECT pg_advisory_xact_lock($1, hashtext($2 || '/' || $3))"
SQL_MODELS = "SELECT model_id, tokens_per_sec FROM models"
SQL_POOL_NODES = """
SELECT n.name, n.status, n.status_reason, n.spot, n.throughput_tokens_per_sec, (m.name IS NOT NULL) AS managed,
       EXTRACT(EPOCH FROM coalesce(m.launched_at, n.created_at))::float8 AS launched_at,
       l.requests_running, l.requests_waiting, l.kv_cache_usage, l.generation_tokens_per_sec,
       coalesce(l.metrics_at > now() - make_interval(secs => $3), false) AS fresh,
       coalesce(n.status = 'draining' AND l.metrics_at > n.status_changed_at + make_interval(secs => $4), false)
           AS scraped_since_drain
FROM nodes n
LEFT JOIN fleet_machines m ON m.name = n.name AND m.state NOT IN ('terminated', 'failed')
LEFT JOIN node_load l ON l.node_id = n.node_id
WHERE n.region = $1 AND $2 = ANY (n.model_list) AND n.reserved_org_id IS NULL AND n.status <> 'terminated'
  AND (m.name IS NOT NULL OR n.status IN ('active', 'draining'))
"""
SQL_REPLACED = """
SELECT replaces FROM fleet_machines WHERE region = $1 AND model = $2 AND replaces IS NOT NULL
  AND state NOT IN ('failed', 'terminated')
"""
SQL_MEMORY = """
SELECT EXTRACT(EPOCH FROM pressure_since)::float8 AS pressure_since,
       EXTRACT(EPOCH FROM calm_since)::float8 AS calm_since,
       EXTRACT(EPOCH FROM last_scale_up_at)::float8 AS last_scale_up_at,
       EXTRACT(EPOCH FROM last_scale_down_at)::float8 AS last_scale_down_at, launch_failures,
       EXTRACT(EPOCH FROM next_launch_at)::float8 AS next_launch_at,
       EXTRACT(EPOCH FROM spot_unavailable_until)::float8 AS spot_unavailable_until
FROM fleet_pool_state WHERE region = $1 AND model = $2
"""
SQL_SAVE_MEMORY = """
INSERT INTO fleet_pool_state AS s (region, model, pressure_since, calm_since, last_scale_up_at, last_scale_down_at,
    launch_failures, next_launch_at, spot_unavailable_until)
VALUES ($1, $2, to_timestamp($3), to_timestamp($4), to_timestamp($5), to_timestamp($6), $7, to_timestamp($8),
        to_timestamp($9))
ON CONFLICT (region, model) DO UPDATE SET pressure_since = EXCLUDED.pressure_since, calm_since = EXCLUDED.calm_since,
    last_scale_up_at = EXCLUDED.last_scale_up_at, last_scale_down_at = EXCLUDED.last_scale_down_at,
    launch_failures = EXCLUDED.launch_failures, next_launch_at = EXCLUDED.next_launch_at,
    spot_unavailable_until = EXCLUDED.spot_unavailable_until
"""
SQL_CLAIM_MACHINE = """
INSERT INTO fleet_machines (name, region, model, provider, spot, gpu_type, price_microdollars_per_hour, reason,
                            replaces, claimed_by, launched_at)
VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, 0), $8, $9, $10, to_timestamp($11))
"""
SQL_CLAIM_NODE = """
INSERT INTO nodes (name, region, cloud, spot, gpu_type, model_list, endpoint_host, endpoint_port, status, status_reason,
                   price_microdollars_per_hour)
VALUES ($1, $2, $3, $4, $5, ARRAY[$6::text], '', 0, 'provisioning', $7, $8)
"""
SQL_DRAIN = "UPDATE nodes SET status = 'draining', status_reason = $2 WHERE name = $1 AND status = 'active'"
SQL_CLAIM_TERMINATE = f"""
UPDATE fleet_machines SET state = 'terminating', reason = $2, state_changed_at = now()
WHERE name = $1 AND (state IN ('provisioning', 'registering', 'running')
                     OR (state = 'terminating' AND state_changed_at < now() - interval '{STALE_CLAIM_S} seconds'))
RETURNING provider
"""
SQL_TERMINATED_MACHINE = """
UPDATE fleet_machines SET state = 'terminated', state_changed_at = now() WHERE name = $1
"""
# The node row keeps its history (node_lifetimes closes here); its address is cleared only if it never had one.
SQL_TERMINATED_NODE = """
UPDATE nodes SET status = 'terminated', status_reason = $2 WHERE name = $1 AND status <> 'terminated'
"""
SQL_LAUNCH_FAILED = """
UPDATE fleet_machines SET state = 'failed', reason = $2, state_changed_at = now() WHERE name = $1
"""
SQL_LAUNCHED_MACHINE = """
UPDATE fleet_machines SET state = 'registering', machine_id = $2,
    price_microdollars_per_hour = coalesce($3, price_microdollars_per_hour), state_changed_at = now()
WHERE name = $1 AND state = 'provisioning'
"""
SQL_LAUNCHED_NODE = """
UPDATE nodes SET status = 'registering', status_reason = 'machine up',
    price_microdollars_per_hour = coalesce($2, price_microdollars_per_hour)
WHERE name = $1 AND status = 'provisioning'
"""
SQL_MARK_RUNNING = """
UPDATE fleet_machines m SET state = 'running', state_changed_at = now()
FROM nodes n WHERE n.name = m.name AND n.status = 'active' AND m.state IN ('provisioning', 'registering')
  AND m.region = $1 AND m.model = $2
"""
SQL_AUDIT = """
INSERT INTO audit_log (actor, action, target_type, target_id, details) VALUES ($1, $2, 'node', $3, $4::jsonb)
"""


def node_state(row: asyncpg.Record, load: float | None) -> NodeState:
    running = row["requests_running"] or 0.0
    waiting = row["requests_waiting"] or 0.0
    return NodeState(name=row["name"], status=row["status"], reason=row["status_reason"], managed=row["managed"],
                     spot=row["spot"], launched_at=row["launched_at"], load=load, in_flight=running + waiting,
                     drained_idle=row["scraped_since_drain"] and running + waiting == 0)


def memory_from(row: asyncpg.Record | None) -> PoolMemory:
    if row is None:
        return PoolMemory()
    return PoolMemory(**dict(row))


def memory_args(memory: PoolMemory) -> tuple:
    return (memory.pressure_since, memory.calm_since, memory.last_scale_up_at, memory.last_scale_down_at,
            memory.launch_failures, memory.next_launch_at, memory.spot_unavailable_until)


async def audit(conn: asyncpg.Connection, actor: str, action: str, name: str, details: dict) -> None:
    await conn.execute(SQL_AUDIT, actor, action, name, json.dumps(details, default=str))


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
