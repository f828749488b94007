"""Prometheus metrics of the autoscaler (`crosslogic serve fleet --listen`, /metrics): every decision counted by
kind and reason, each pool's nodes by state, its desired size and load. Base units (seconds, ratios)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from crosslogic.fleet.decide import Decision, NodeState
from crosslogic.fleet.policy import PoolPolicy

STATES = ("provisioning", "registering", "active", "draining", "dead")
_POOL = ("region", "model")


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter("crosslogic_fleet_decisions", "Autoscaler actions taken (launch, drain, terminate)",
                                 (*_POOL, "action", "reason"), registry=r)
        self.launch_failures = Counter("crosslogic_fleet_launch_failures", "Launches the provider refused or failed",
                                       (*_POOL, "kind"), registry=r)
        self.launch_seconds = Histogram("crosslogic_fleet_launch_seconds", "Time the provider took to launch a machine",
                                        _POOL, buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200), registry=r)
        self.nodes = Gauge("crosslogic_fleet_nodes", "Nodes of a fleet-managed pool by lifecycle state",
                           (*_POOL, "state"), registry=r)
        self.desired = Gauge("crosslogic_fleet_desired_nodes", "Nodes the autoscaler wants in the pool", _POOL,
                             registry=r)
        self.load = Gauge("crosslogic_fleet_pool_load_ratio", "Mean load of the pool's active nodes (1 = full)", _POOL,
                          registry=r)
        self.policy_rejected = Gauge("crosslogic_fleet_policy_rejected", "1 while the pool's policy row is rejected",
                                     _POOL, registry=r)

    def observe(self, policy: PoolPolicy, decision: Decision, nodes: list[NodeState]) -> None:
        pool = (policy.region, policy.model)
        counts = Tally(n.status for n in nodes)
        for state in STATES:
            self.nodes.labels(*pool, state).set(counts.get(state, 0))
        self.desired.labels(*pool).set(decision.desired)
        self.load.labels(*pool).set(decision.load)
