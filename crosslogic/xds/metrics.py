"""Scheduler and node-registry metrics of the xDS process (its /metrics, XDS_METRICS_PORT).

Pushes and ADS streams say whether Envoy follows the control plane; nodes by status, their status changes
(churn) and pool endpoints by health say what the region has; per-node load (the agents' last report) says how
busy it is. Node labels are bounded by the fleet (one series per machine, gone when the machine's row is removed).
With several xDS replicas each exports the same registry view: aggregate with max(), not sum().
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Mapping

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

from crosslogic.xds.model import EndpointHealth, Pool

streams = Gauge("crosslogic_xds_streams", "ADS streams open (one per connected Envoy)")
responses = Counter("crosslogic_xds_responses", "Discovery responses sent to Envoy, by resource type", ["type"])
nacks = Counter("crosslogic_xds_nacks", "Discovery responses Envoy rejected (it keeps its last good config)",
                ["type"])
snapshots = Counter("crosslogic_xds_snapshots_pushed", "Snapshots that changed something and were pushed")
# One rebuild: sweep + policy + pools from Postgres + snapshot, normally a few milliseconds.
rebuild_seconds = Histogram("crosslogic_xds_rebuild_duration_seconds", "Time of one scheduler rebuild (registry "
                            "sweep, policy, pools, snapshot)", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                        0.1, 0.25, 0.5, 1.0, 2.5))
rebuild_failures = Counter("crosslogic_xds_rebuild_failures", "Rebuilds that failed: routing state unreadable "
                           "(Envoy keeps the last snapshot)")
policy_rejected = Gauge("crosslogic_routing_policy_rejected", "1 while the routing policy in Postgres is rejected "
                        "(the last good one is served)")
pool_endpoints = Gauge("crosslogic_pool_endpoints", "Endpoints of each shared pool in its own region, by health",
                       ["region", "model", "health"])

nodes = Gauge("crosslogic_nodes", "Registered nodes by region, model and registry status",
              ["region", "model", "status"])
node_changes = Counter("crosslogic_node_status_changes", "Node registry changes seen by the scheduler: a node "
                       "joined, changed status, or was removed (churn)", ["region", "change"])
capacity = Gauge("crosslogic_pool_capacity_tokens_per_second", "Expected decode capacity of a pool's active "
                 "nodes (the nodes' configured throughput)", ["region", "model"])
_NODE = ("node", "region")
node_running = Gauge("crosslogic_node_requests_running", "Requests the node's engine is running", _NODE)
node_waiting = Gauge("crosslogic_node_requests_waiting", "Requests waiting in the node's engine queue", _NODE)
node_kv = Gauge("crosslogic_node_kv_cache_usage_ratio", "KV-cache use of the node's engine (0..1)", _NODE)
node_tps = Gauge("crosslogic_node_generation_tokens_per_second", "Decode rate the node's agent measured", _NODE)
node_ttft = Gauge("crosslogic_node_ttft_seconds", "Mean time to first token over the agent's last report", _NODE)
_NODE_GAUGES = (node_running, node_waiting, node_kv, node_tps, node_ttft)

_NODES_SQL = """
SELECT n.node_id::text AS node_id, n.name, n.region, n.status, n.model_list, n.throughput_tokens_per_sec,
       l.requests_running, l.requests_waiting, l.kv_cache_usage, l.generation_tokens_per_sec, l.ttft_s, l.metrics_at
FROM nodes n LEFT JOIN node_load l USING (node_id)
"""


def type_name(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


class NodeObserver:
    """Turns successive reads of the registry (and the pools built from it) into gauges and change counts; the
    first read counts no change."""

    def __init__(self) -> None:
        self._status: dict[str, tuple[str, str]] | None = None  # node id -> (region, status)
        self._node_series: set[tuple[str, str]] = set()
        self._node_counts: set[tuple[str, str, str]] = set()
        self._capacity: set[tuple[str, str]] = set()
        self._pools: set[tuple[str, str, str]] = set()

    def observe_pools(self, pools: Iterable[Pool]) -> None:
        """Endpoints of each shared pool in its own region (priority 0), by health; lanes are the orgs' own."""
        counts: Tally = Tally()
        for pool in pools:
            if pool.lane is not None or pool.local_only:
                continue
            for health in EndpointHealth:
                counts.setdefault((pool.region, pool.model, health.value), 0)
            for endpoint in pool.endpoints:
                if endpoint.priority == 0:
                    counts[(pool.region, pool.model, endpoint.health.value)] += 1
        _replace(pool_endpoints, self._pools, counts)

    def observe(self, rows: Iterable[Mapping]) -> None:
        rows = list(rows)
        current = {r["node_id"]: (r["region"], r["status"]) for r in rows}
        if self._status is not None:
            for node_id, (region, status) in current.items():
                before = self._status.get(node_id)
                if before is None:
                    node_changes.labels(region, "joined").inc()
                elif before[1] != status:
                    node_changes.labels(region, status).inc()
            for node_id, (region, _) in self._status.items():
                if node_id not in current:
                    node_changes.labels(region, "removed").inc()
        self._status = current

        counts = Tally((r["region"], model, r["status"]) for r in rows for model in r["model_list"])
        tps = Tally()
        for r in rows:
            if r["status"] == "active":
                for model in r["model_list"]:
                    tps[(r["region"], model)] += r["throughput_tokens_per_sec"] or 0
        _replace(nodes, self._node_counts, counts)
        _replace(capacity, self._capacity, tps)
        series = set()
        for r in rows:
            if r["metrics_at"] is None:
                continue
            key = (r["name"], r["region"])
            series.add(key)
            for gauge, column in zip(_NODE_GAUGES, ("requests_running", "requests_waiting", "kv_cache_usage",
                                                    "generation_tokens_per_sec", "ttft_s"), strict=True):
                gauge.labels(*key).set(r[column] or 0)
        for gone in self._node_series - series:
            for gauge in _NODE_GAUGES:
                gauge.remove(*gone)
        self._node_series = series

    async def read(self, conn: asyncpg.Connection) -> None:
        self.observe(await conn.fetch(_NODES_SQL))


def _replace(gauge: Gauge, known: set, values: Mapping[tuple, float]) -> None:
    """Sets every series in `values` and removes the ones that are no longer there."""
    for key, value in values.items():
        gauge.labels(*key).set(value)
    for gone in known - set(values):
        gauge.remove(*gone)
    known.clear()
    known.update(values)
