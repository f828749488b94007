"""Node pools from Postgres: which nodes serve which model in which region, with health, load-aware
weights and failover priorities."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import asyncpg

from crosslogic.xds.model import EndpointHealth, Pool, PoolEndpoint
from crosslogic.xds.node_registry import LATENCY_SPIKE_FACTOR, Lifetimes
from crosslogic.xds.policy import RoutingPolicy
from crosslogic.xds.scoring import NodeLoad, eds_weight

_NODES_SQL = """
SELECT n.node_id::text AS node_id, n.region, n.endpoint_host, n.endpoint_port, n.weight, n.status, n.model_list,
       n.agent_managed, n.throughput_tokens_per_sec, n.reserved_org_id::text AS reserved_org_id,
       n.site_id::text AS site_id,
       EXTRACT(EPOCH FROM now() - l.last_heartbeat_at)::float8 AS heartbeat_age_s, l.engine_healthy,
       l.requests_running, l.requests_waiting, l.kv_cache_usage, l.generation_tokens_per_sec, l.metrics_at,
       l.ttft_s, l.ttft_baseline_s
FROM nodes n LEFT JOIN node_load l USING (node_id)
WHERE n.status IN ('active', 'draining')  -- provisioning / registering / dead / terminated are never routed
ORDER BY n.node_id  -- a stable order: the same state gives the same snapshot version on every xDS replica
"""
_MODELS_SQL = "SELECT model_id, tokens_per_sec FROM models WHERE status = 'active'"

MIN_SPIKE_S = 0.1
_STATUS_HEALTH = {"active": EndpointHealth.HEALTHY, "draining": EndpointHealth.DRAINING}


@dataclass(frozen=True)
class NodeView:
    """One node as the scheduler sees it: its registry status and liveness, already decided."""

    node_id: str
    region: str
    host: str
    port: int
    models: tuple[str, ...]
    health: EndpointHealth
    load: NodeLoad | None  # None: no metrics (static node or not scraped yet) -> the configured weight
    static_weight: int = 100
    reserved_org: str | None = None  # a dedicated node of this org (its reserved lane)
    site: str | None = None  # an on-prem site's node: only that site's gateway routes to it (xds/sites.py)


def node_health(status: str, agent_managed: bool, heartbeat_age_s: float | None,
                lifetimes: Lifetimes, engine_healthy: bool = True) -> EndpointHealth:
    """The registry state machine as seen by Envoy (module docstring of node_registry)."""
    health = _STATUS_HEALTH.get(status, EndpointHealth.UNHEALTHY)
    if health is EndpointHealth.HEALTHY and agent_managed and (
            heartbeat_age_s is None or heartbeat_age_s > lifetimes.heartbeat_timeout_s or not engine_healthy):
        return EndpointHealth.UNHEALTHY
    return health


def latency_spike(ttft_s: float | None, baseline_s: float | None) -> bool:
    """Seed §22.2: TTFT above 3x the node's baseline (and at least 100 ms above it, so that jitter on a
    millisecond baseline is not a spike)."""
    if not ttft_s or not baseline_s:
        return False
    return ttft_s > max(LATENCY_SPIKE_FACTOR * baseline_s, baseline_s + MIN_SPIKE_S)


def node_view(row: Mapping, lifetimes: Lifetimes) -> NodeView:
    load = None
    if row.get("metrics_at") is not None:
        load = NodeLoad(requests_running=row["requests_running"], requests_waiting=row["requests_waiting"],
                        kv_cache_usage=row["kv_cache_usage"], tokens_per_sec=row["generation_tokens_per_sec"],
                        capacity_tokens_per_sec=float(row["throughput_tokens_per_sec"] or 0))
    health = node_health(row["status"], row.get("agent_managed", False), row.get("heartbeat_age_s"), lifetimes,
                         row.get("engine_healthy") is not False)
    if health is EndpointHealth.HEALTHY and latency_spike(row.get("ttft_s"), row.get("ttft_baseline_s")):
        # DEGRADED, not UNHEALTHY: Envoy still uses it when the healthy hosts are not enough, so a load spike
        # that slows every node cannot empty the pool.
        health = EndpointHealth.DEGRADED
    return NodeView(node_id=row["node_id"], region=row["region"], host=row["endpoint_host"],
                    port=row["endpoint_port"], models=tuple(row["model_list"]), health=health,
                    load=load, static_weight=row.get("weight", 100), reserved_org=row.get("reserved_org_id"),
                    site=row.get("site_id"))


def _weight(node: NodeView, policy: RoutingPolicy, region: str, reference_tps: float) -> int:
    rules = policy.for_region(region)
    if node.load is None or not rules.load_aware:
        return node.static_weight
    return eds_weight(node.load, rules.score_weights, rules.queue_capacity, reference_tps)


def _endpoints(by_priority: list[list[NodeView]], policy: RoutingPolicy, reference_tps: float) -> list[PoolEndpoint]:
    return [PoolEndpoint(node_id=node.node_id, host=node.host, port=node.port,
                         weight=_weight(node, policy, node.region, reference_tps), health=node.health,
                         priority=priority)
            for priority, group in enumerate(by_priority) for node in group]


def _throttled(pool: Pool) -> list[Pool]:
    """A pool whose spill share is below 1 and that has fallback nodes gets a local-only twin cluster."""
    if pool.spill_share >= 1.0 or all(e.priority == 0 for e in pool.endpoints):
        return [replace(pool, spill_share=1.0)]
    local = tuple(e for e in pool.endpoints if e.priority == 0)
    return [pool, replace(pool, endpoints=local, local_only=True)]


def assemble_pools(nodes: list[NodeView], policy: RoutingPolicy, models: Mapping[str, float]) -> list[Pool]:
    """One pool per (region, model) that has at least one node in the region or its fallback chain.

    A region's own nodes are priority 0; nodes of the n-th fallback region are priority n, which Envoy
    uses only when every higher priority has no healthy host. A strictly pinned region has no fallbacks.
    Weights follow each node's own region policy (its scorer weights), priorities the pool's region.

    Reserved lanes: an org with dedicated nodes gets its own pool per (region, model), `region/model@org`:
    its own nodes first (region, then fallbacks), then the shared pool's nodes at the following priorities,
    so a dedicated customer spills onto serverless capacity rather than failing. Nobody else reaches them.
    """
    by_lane: dict[tuple[str | None, str, str], list[NodeView]] = {}
    for node in nodes:
        for model in node.models:
            if model in models:
                by_lane.setdefault((node.reserved_org, node.region, model), []).append(node)
    lanes = sorted({node.reserved_org for node in nodes if node.reserved_org})
    pools = []
    for region, chain in sorted(policy.regions.items()):
        rules = policy.for_region(region)
        sources = [region] if rules.pinning == "strict" else [region, *[r for r in chain if r != region]]
        for model in sorted(models):
            shared = _endpoints([by_lane.get((None, source, model), []) for source in sources], policy,
                                models[model])
            if shared:
                pools += _throttled(Pool(region=region, model=model, endpoints=tuple(shared), retries=rules.retries,
                                         spill_share=rules.spill_share))
            for org in lanes:
                dedicated = _endpoints([by_lane.get((org, source, model), []) for source in sources], policy,
                                       models[model])
                if dedicated or shared:
                    spill = [replace(e, priority=e.priority + len(sources)) for e in shared]
                    pools += _throttled(Pool(region=region, model=model, endpoints=tuple(dedicated + spill),
                                             retries=rules.retries, lane=org, spill_share=rules.spill_share))
    return pools


async def load_nodes(conn: asyncpg.Connection, lifetimes: Lifetimes) -> tuple[list[NodeView], dict[str, float]]:
    """Every routable node (cloud and site) and the active models with their reference throughput."""
    nodes = [node_view(dict(r), lifetimes) for r in await conn.fetch(_NODES_SQL)]
    return nodes, {r["model_id"]: float(r["tokens_per_sec"]) for r in await conn.fetch(_MODELS_SQL)}


def cloud_pools(nodes: list[NodeView], policy: RoutingPolicy, models: Mapping[str, float]) -> list[Pool]:
    """The cloud gateways' pools: never a site's node (it is on the site's LAN, and only its org's)."""
    return assemble_pools([n for n in nodes if n.site is None], policy, models)


async def load_pools(conn: asyncpg.Connection, policy: RoutingPolicy, lifetimes: Lifetimes) -> list[Pool]:
    nodes, models = await load_nodes(conn, lifetimes)
    return cloud_pools(nodes, policy, models)
