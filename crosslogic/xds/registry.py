"""Node pools from Postgres: which nodes serve which model in which region, with failover priorities."""

from __future__ import annotations

import asyncpg

from crosslogic.xds.model import EndpointHealth, Pool, PoolEndpoint

_NODES_SQL = """
SELECT node_id::text AS node_id, region, endpoint_host, endpoint_port, weight, status, model_list
FROM nodes
WHERE status <> 'dead' AND reserved_org_id IS NULL
"""
_REGIONS_SQL = "SELECT region_id, fallback_chain FROM regions WHERE status = 'active'"
_MODELS_SQL = "SELECT model_id FROM models WHERE status = 'active'"

_HEALTH = {"active": EndpointHealth.HEALTHY, "draining": EndpointHealth.DRAINING}


def assemble_pools(nodes: list[dict], regions: dict[str, list[str]], models: set[str]) -> list[Pool]:
    """One pool per (region, model) that has at least one node in the region or its fallback chain.

    A region's own nodes are priority 0; nodes of the n-th fallback region are priority n, which Envoy
    uses only when every higher priority has no healthy host.
    """
    by_region_model: dict[tuple[str, str], list[dict]] = {}
    for node in nodes:
        for model in node["model_list"]:
            if model in models:
                by_region_model.setdefault((node["region"], model), []).append(node)
    pools = []
    for region, chain in sorted(regions.items()):
        for model in sorted(models):
            endpoints = []
            for priority, source_region in enumerate([region, *[r for r in chain if r != region]]):
                for node in by_region_model.get((source_region, model), []):
                    endpoints.append(PoolEndpoint(
                        node_id=node["node_id"], host=node["endpoint_host"], port=node["endpoint_port"],
                        weight=node["weight"], health=_HEALTH.get(node["status"], EndpointHealth.UNHEALTHY),
                        priority=priority))
            if endpoints:
                pools.append(Pool(region=region, model=model, endpoints=tuple(endpoints)))
    return pools


async def load_pools(conn: asyncpg.Connection) -> list[Pool]:
    nodes = [dict(r) for r in await conn.fetch(_NODES_SQL)]
    regions = {r["region_id"]: list(r["fallback_chain"]) for r in await conn.fetch(_REGIONS_SQL)}
    models = {r["model_id"] for r in await conn.fetch(_MODELS_SQL)}
    return assemble_pools(nodes, regions, models)
