"""FinOps (seed §43): GPU cost per node hour -> cost per token, revenue and margin per model and region.

Pure maths over plain values (tested without a database); `load_report` gathers them from Postgres.
A node's cost over the window is its hourly GPU price (the price its provider quoted when the fleet launched it,
else gpu_prices by type, cloud, spot) times the hours it
was alive inside the window, shared evenly among the models it served then. Hours come from node_lifetimes
(migration 007: a row per span a node was alive with the same region, cloud, spot, GPU and models, written by
a trigger on nodes), so nodes that died (evicted spot nodes) or whose rows the registry deleted keep every
hour they ran. All money in integer micro-dollars.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class NodeCost:
    region: str
    models: tuple[str, ...]
    microdollars_per_hour: int
    seconds_in_window: int


@dataclass(frozen=True)
class ModelUsage:
    region: str
    model: str
    tokens: int
    revenue_microdollars: int  # what the ledger charged (before free tier)
    billed_microdollars: int  # what went to Stripe (after free tier / plans)


@dataclass(frozen=True)
class FinopsRow:
    region: str
    model: str
    tokens: int
    revenue_microdollars: int
    billed_microdollars: int
    gpu_cost_microdollars: int
    margin_microdollars: int
    gpu_cost_per_1m_tokens_microdollars: int | None


def node_cost_microdollars(node: NodeCost) -> int:
    return (node.microdollars_per_hour * node.seconds_in_window + 1800) // 3600


def finops_rows(nodes: list[NodeCost], usage: list[ModelUsage]) -> list[FinopsRow]:
    cost: dict[tuple[str, str], int] = {}
    for node in nodes:
        if not node.models:
            continue
        total = node_cost_microdollars(node)
        share, rest = divmod(total, len(node.models))
        for i, model in enumerate(sorted(node.models)):
            key = (node.region, model)
            cost[key] = cost.get(key, 0) + share + (1 if i < rest else 0)
    by_key = {(u.region, u.model): u for u in usage}
    rows = []
    for region, model in sorted(set(cost) | set(by_key)):
        u = by_key.get((region, model), ModelUsage(region, model, 0, 0, 0))
        gpu = cost.get((region, model), 0)
        per_1m = (gpu * 1_000_000 + u.tokens // 2) // u.tokens if u.tokens else None
        rows.append(FinopsRow(region, model, u.tokens, u.revenue_microdollars, u.billed_microdollars, gpu,
                              u.revenue_microdollars - gpu, per_1m))
    return rows


# A node's own price (what the fleet's provider quoted for that machine, spot or on-demand: node_lifetimes
# .microdollars_per_hour, migration 009) wins over the operator's gpu_prices row for its GPU, cloud and spot flag.
_NODES_SQL = """
SELECT l.region, l.model_list, coalesce(l.microdollars_per_hour, g.microdollars_per_hour, 0) AS per_hour,
       greatest(0, round(extract(epoch FROM least($2, coalesce(l.ended_at, now()))
                                  - greatest($1, l.started_at))))::bigint AS seconds
FROM node_lifetimes l
LEFT JOIN gpu_prices g ON g.gpu_type = l.gpu_type AND g.cloud = l.cloud AND g.spot = l.spot
WHERE l.started_at < least($2, now()) AND coalesce(l.ended_at, now()) > $1
"""
_USAGE_SQL = """
SELECT region, model, sum(total_tokens)::bigint AS tokens, sum(cost_microdollars)::bigint AS revenue,
       coalesce(sum(billable_microdollars), 0)::bigint AS billed
FROM usage_records WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY 1, 2
"""


async def load_report(conn: asyncpg.Connection, start: datetime, end: datetime) -> list[dict]:
    nodes = [NodeCost(r["region"], tuple(r["model_list"]), r["per_hour"], r["seconds"])
             for r in await conn.fetch(_NODES_SQL, start, end)]
    usage = [ModelUsage(r["region"], r["model"], r["tokens"], r["revenue"], r["billed"])
             for r in await conn.fetch(_USAGE_SQL, start, end)]
    return [asdict(row) for row in finops_rows(nodes, usage)]
