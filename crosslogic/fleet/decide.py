"""The autoscaler's decision for one pool: a pure function of the policy, the pool's nodes, what the last tick
remembered and the time. No I/O: the caller (crosslogic/fleet/autoscaler.py) reads the registry, calls this,
writes the actions as claims in the same transaction and then asks the provider. Property-tested
(tests/test_fleet_decide.py): the floor and max_nodes always hold, no scaling against the last move inside a
cooldown, and no node with work in flight is ever drained or terminated.

Counting: *capacity* = active nodes + machines being launched (provisioning, registering). Draining nodes do not
count (they take no new requests), so a spot notice lowers capacity at once and its replacement is launched in
the same tick, whatever the cooldown; so is the replacement of a machine that missed its registration deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from crosslogic.fleet.policy import PoolPolicy

SPOT_EVICTION = "spot eviction"  # the registry's status_reason prefix for a spot notice (xds/nodeagent.py)
SCALE_DOWN = "scale down"
MAX_BACKOFF_FACTOR = 32


@dataclass(frozen=True)
class NodeState:
    """One node of the pool as the autoscaler sees it."""

    name: str
    status: str  # provisioning, registering, active, draining, dead (terminated nodes are not passed)
    reason: str = ""
    managed: bool = True  # launched by the fleet: it may drain and terminate it
    spot: bool = False
    launched_at: float = 0.0  # epoch s: when the fleet asked for it (managed only)
    load: float | None = None  # 0..: see node_load(); None = no fresh metrics
    in_flight: float = 0.0  # running + waiting requests at the last scrape
    drained_idle: bool = False  # draining, and a scrape after the drain began saw nothing in flight


@dataclass(frozen=True)
class PoolMemory:
    """What one tick leaves for the next (fleet_pool_state)."""

    pressure_since: float | None = None
    calm_since: float | None = None
    last_scale_up_at: float | None = None
    last_scale_down_at: float | None = None
    launch_failures: int = 0
    next_launch_at: float | None = None
    spot_unavailable_until: float | None = None


@dataclass(frozen=True)
class Launch:
    spot: bool
    reason: str
    replaces: str | None = None


@dataclass(frozen=True)
class Drain:
    name: str
    reason: str


@dataclass(frozen=True)
class Terminate:
    name: str
    reason: str


Action = Launch | Drain | Terminate


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    memory: PoolMemory
    desired: int  # the node count the pool wants now
    load: float  # mean load of the active nodes


def node_load(running: float, waiting: float, kv_cache_usage: float, tokens_per_sec: float,
              capacity_tokens_per_sec: float, queue_capacity: int) -> float:
    """A node's load, 1.0 = full: the highest of its queue (waiting / queue_capacity), its KV cache use and its
    decode rate against its capacity. The highest, because any one of them full means new requests wait."""
    del running  # running requests are what a node is for: only queueing and memory say it is full
    queue = waiting / queue_capacity if queue_capacity > 0 else 0.0
    throughput = tokens_per_sec / capacity_tokens_per_sec if capacity_tokens_per_sec > 0 else 0.0
    return max(0.0, queue, kv_cache_usage, throughput)


def backoff_s(policy: PoolPolicy, failures: int) -> float:
    """Delay before the next launch after `failures` failed ones in a row: retry_base doubling, capped."""
    return policy.retry_base_s * min(MAX_BACKOFF_FACTOR, 2 ** max(0, failures - 1))


def _since(mark: float | None, condition: bool, now: float) -> float | None:
    if not condition:
        return None
    return now if mark is None else mark


def _cooled(mark: float | None, now: float, cooldown_s: float) -> bool:
    return mark is None or now - mark >= cooldown_s


def launch_spot(policy: PoolPolicy, memory: PoolMemory, now: float) -> bool:
    """Spot when the policy wants it, unless spot capacity was just found missing and on-demand is allowed."""
    if not policy.spot:
        return False
    short = memory.spot_unavailable_until is not None and now < memory.spot_unavailable_until
    return not (short and policy.on_demand_fallback)


def decide(policy: PoolPolicy, node_capacity_tps: float, nodes: list[NodeState], memory: PoolMemory,
           now: float, replaced: frozenset[str] = frozenset()) -> Decision:
    """`replaced`: names that already have a replacement machine (fleet_machines.replaces)."""
    actions: list[Action] = []
    floor = min(policy.floor_nodes(node_capacity_tps), policy.max_nodes)
    active = [n for n in nodes if n.status == "active"]
    pending = [n for n in nodes if n.status in ("provisioning", "registering")]

    # Machines that missed their registration deadline are given back and replaced (below).
    late = [n for n in pending if n.managed and now - n.launched_at > policy.register_deadline_s]
    pending = [n for n in pending if n not in late]
    actions += [Terminate(n.name, "never registered") for n in late]
    # Drained, dead or evicted machines are given back once nothing runs on them any more.
    for n in nodes:
        if n.managed and (n.status == "dead" or (n.status == "draining" and n.drained_idle)):
            actions.append(Terminate(n.name, n.reason or n.status))  # keeps why it went: scale down, eviction

    loads = [n.load if n.load is not None else policy.target_load for n in active]
    mean_load = sum(loads) / len(loads) if loads else 0.0
    wanted = math.ceil(sum(loads) / policy.target_load - 1e-9) if loads else 0
    desired = max(floor, min(policy.max_nodes, wanted))
    capacity = len(active) + len(pending)
    can_launch = memory.next_launch_at is None or now >= memory.next_launch_at
    spot = launch_spot(policy, memory, now)
    pressure_since = _since(memory.pressure_since, mean_load > policy.target_load, now)
    calm_since = _since(memory.calm_since, capacity > desired and mean_load < policy.target_load and not pending, now)
    launched = drained = 0

    def launch(reason: str, replaces: str | None = None) -> None:
        nonlocal capacity, launched
        actions.append(Launch(spot, reason, replaces))
        capacity += 1
        launched += 1

    if can_launch:
        # At once, whatever the cooldown: replacements for spot notices and missed deadlines, then the floor.
        # (an idle evicted node may have drained to dead before this tick already)
        lost = [n for n in nodes if n.status in ("draining", "dead") and n.reason.startswith(SPOT_EVICTION)
                and n.name not in replaced] + late
        for n in lost:  # the load it carried has not reached the other nodes yet: replace it, whatever desired says
            if capacity < policy.max_nodes:
                launch(f"replace {n.name} ({'never registered' if n in late else 'spot eviction'})", n.name)
        while capacity < floor:
            launch("below the floor")
        # Sustained pressure, outside the cooldown of the last scaling in either direction.
        sustained = pressure_since is not None and now - pressure_since >= policy.scale_up_after_s
        if sustained and _cooled(memory.last_scale_down_at, now, policy.cooldown_s) \
                and _cooled(memory.last_scale_up_at, now, policy.cooldown_s):
            while capacity < desired:
                launch(f"load {mean_load:.2f} above target {policy.target_load:.2f}")

    # Down only by draining, one node per cooldown, never a node with work in flight, never below the floor.
    calm = calm_since is not None and now - calm_since >= policy.scale_down_after_s
    if calm and not launched and _cooled(memory.last_scale_up_at, now, policy.cooldown_s) \
            and _cooled(memory.last_scale_down_at, now, policy.cooldown_s) and len(active) - 1 >= floor:
        idle = [n for n in active if n.managed and n.in_flight == 0]
        if idle:
            # On-demand first (it costs more), then the least loaded.
            victim = min(idle, key=lambda n: (n.spot, n.load or 0.0, n.name))
            actions.append(Drain(victim.name, SCALE_DOWN))
            drained = 1

    new_memory = replace(
        memory, pressure_since=None if launched else pressure_since, calm_since=None if drained else calm_since,
        last_scale_up_at=now if launched else memory.last_scale_up_at,
        last_scale_down_at=now if drained else memory.last_scale_down_at)
    return Decision(tuple(actions), new_memory, desired, mean_load)


def after_launch_failure(policy: PoolPolicy, memory: PoolMemory, now: float, *, spot: bool,
                         capacity_unavailable: bool) -> PoolMemory:
    """Spot capacity missing: fall back to on-demand at once where the policy allows it (spot is tried again
    after the backoff); any other failure: wait the backoff before the next launch."""
    if capacity_unavailable and spot and policy.on_demand_fallback:
        return replace(memory, spot_unavailable_until=now + backoff_s(policy, memory.launch_failures + 1))
    failures = memory.launch_failures + 1
    return replace(memory, launch_failures=failures, next_launch_at=now + backoff_s(policy, failures))


def after_launch_success(memory: PoolMemory) -> PoolMemory:
    return replace(memory, launch_failures=0, next_launch_at=None)
