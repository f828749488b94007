"""The autoscaler's decision (crosslogic/fleet/decide.py) as a pure function: examples, then properties over random
pools and whole random runs with an injected clock."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crosslogic.fleet.decide import (
    Drain,
    Launch,
    NodeState,
    PoolMemory,
    Terminate,
    after_launch_failure,
    backoff_s,
    decide,
    node_load,
)
from crosslogic.fleet.policy import FleetPolicyRejected, PoolPolicy, defaults, validate

POLICY = PoolPolicy("r", "m", min_nodes=1, max_nodes=5, target_load=0.5, scale_up_after_s=10, scale_down_after_s=30,
                    cooldown_s=20, register_deadline_s=60, retry_base_s=5)
CAPACITY = 1000.0


def active(name: str, load: float, in_flight: float = 0.0, spot: bool = True) -> NodeState:
    return NodeState(name, "active", "registered", spot=spot, load=load, in_flight=in_flight)


def launches(decision) -> list[Launch]:
    return [a for a in decision.actions if isinstance(a, Launch)]


def test_node_load_is_its_fullest_resource():
    assert node_load(3, 2, 0.1, 100, 1000, 4) == 0.5  # the queue
    assert node_load(3, 0, 0.9, 100, 1000, 4) == 0.9  # the KV cache
    assert node_load(3, 0, 0.1, 800, 1000, 4) == 0.8  # decode throughput against capacity


def test_sustained_pressure_scales_up_only_after_it_lasted():
    nodes = [active("a", 1.0, in_flight=6)]
    first = decide(POLICY, CAPACITY, nodes, PoolMemory(), now=100)
    assert launches(first) == [] and first.memory.pressure_since == 100
    later = decide(POLICY, CAPACITY, nodes, first.memory, now=111)
    assert len(launches(later)) == 1  # 1.0 / 0.5 = 2 nodes wanted
    assert later.desired == 2 and later.memory.last_scale_up_at == 111


def test_calm_drains_one_idle_node_after_its_delay_and_never_a_busy_one():
    nodes = [active("a", 0.1, in_flight=1), active("b", 0.0), active("c", 0.0, spot=False)]
    memory = PoolMemory(calm_since=0)
    decision = decide(POLICY, CAPACITY, nodes, memory, now=31)
    assert [a for a in decision.actions if isinstance(a, Drain)] == [Drain("c", "scale down")]  # on-demand first
    busy = [active("a", 0.1, in_flight=1), active("b", 0.1, in_flight=2)]
    assert not any(isinstance(a, Drain) for a in decide(POLICY, CAPACITY, busy, memory, now=31).actions)


def test_spot_notice_launches_the_replacement_at_once_inside_the_cooldown():
    nodes = [active("a", 0.4), NodeState("b", "draining", "spot eviction (aws)", spot=True, in_flight=3)]
    memory = PoolMemory(last_scale_up_at=99, last_scale_down_at=99)
    decision = decide(POLICY, CAPACITY, nodes, memory, now=100)
    assert [(a.replaces, a.spot) for a in launches(decision)] == [("b", True)]
    again = decide(POLICY, CAPACITY, nodes, decision.memory, now=101, replaced=frozenset({"b"}))
    assert launches(again) == []  # one replacement per notice, whichever replica looks next


def test_a_machine_that_never_registers_is_terminated_and_replaced():
    nodes = [active("a", 0.4), NodeState("late", "registering", "machine up", launched_at=0)]
    decision = decide(POLICY, CAPACITY, nodes, PoolMemory(), now=61)
    assert Terminate("late", "never registered") in decision.actions
    assert [a.replaces for a in launches(decision)] == ["late"]


def test_spot_capacity_missing_falls_back_to_on_demand_where_allowed():
    memory = after_launch_failure(POLICY, PoolMemory(), 100, spot=True, capacity_unavailable=True)
    assert memory.next_launch_at is None  # no wait: the next launch is on-demand
    assert [a.spot for a in launches(decide(POLICY, CAPACITY, [], memory, now=101))] == [False]
    strict = replace(POLICY, on_demand_fallback=False)
    memory = after_launch_failure(strict, PoolMemory(), 100, spot=True, capacity_unavailable=True)
    assert memory.next_launch_at == 105 and decide(strict, CAPACITY, [], memory, now=101).actions == ()
    assert [a.spot for a in launches(decide(strict, CAPACITY, [], memory, now=106))] == [True]


def test_failed_launches_back_off_doubling_to_a_cap():
    assert [backoff_s(POLICY, n) for n in (1, 2, 3, 10)] == [5, 10, 20, 160]


def test_reserved_capacity_is_a_floor_of_nodes():
    policy = replace(POLICY, reserved_tokens_per_sec=2500)
    assert len(launches(decide(policy, CAPACITY, [], PoolMemory(), now=0))) == 3


def test_policy_validation_names_the_field():
    row = defaults("r", "m")
    assert validate(row, 1000).max_nodes == 4
    for change, words in [({"min_nodes": 5, "max_nodes": 2}, "above max_nodes"), ({"target_load": 2}, "target_load"),
                          ({"engine": "tgi"}, "engine"), ({"accelerators": "L4;rm -rf"}, "accelerators"),
                          ({"reserved_tokens_per_sec": 10_000}, "need 10 nodes"), ({"spot": "yes"}, "spot")]:
        with pytest.raises(FleetPolicyRejected, match=words):
            validate({**row, **change}, 1000)


# ------------------------------------------------------------------------------------------ properties

policies = st.builds(
    lambda lo, extra, reserved, target, fallback: PoolPolicy(
        "r", "m", min_nodes=lo, max_nodes=max(1, lo + extra), reserved_tokens_per_sec=reserved, target_load=target,
        scale_up_after_s=10, scale_down_after_s=30, cooldown_s=20, register_deadline_s=60, retry_base_s=5,
        on_demand_fallback=fallback),
    st.integers(0, 3), st.integers(0, 4), st.sampled_from([0, 0, 1500, 3000]), st.sampled_from([0.3, 0.5, 0.8]),
    st.booleans())
node_states = st.builds(
    NodeState, name=st.uuids().map(lambda u: u.hex[:6]),
    status=st.sampled_from(["provisioning", "registering", "active", "active", "active", "draining", "dead"]),
    reason=st.sampled_from(["registered", "spot eviction (aws)", "scale down", "no heartbeat"]),
    managed=st.booleans(), spot=st.booleans(), launched_at=st.floats(0, 200),
    load=st.one_of(st.none(), st.floats(0, 3)), in_flight=st.sampled_from([0.0, 0.0, 1.0, 5.0]),
    drained_idle=st.booleans())
moments = st.one_of(st.none(), st.floats(0, 200))
memories = st.builds(PoolMemory, pressure_since=moments, calm_since=moments, last_scale_up_at=moments,
                     last_scale_down_at=moments, next_launch_at=st.one_of(st.none(), st.floats(0, 300)))


def _capacity_after(nodes, decision, now, policy) -> int:
    terminated = {a.name for a in decision.actions if isinstance(a, Terminate)}
    drained = {a.name for a in decision.actions if isinstance(a, Drain)}
    live = [n for n in nodes if n.status in ("active", "provisioning", "registering") and n.name not in terminated
            and n.name not in drained]
    return len(live) + len(launches(decision))


@given(policies, st.lists(node_states, max_size=8, unique_by=lambda n: n.name), memories, st.floats(0, 400))
def test_decisions_keep_the_floor_and_the_maximum(policy, nodes, memory, now):
    before = len([n for n in nodes if n.status in ("active", "provisioning", "registering")])
    decision = decide(policy, CAPACITY, nodes, memory, now)
    after = _capacity_after(nodes, decision, now, policy)
    floor = min(policy.floor_nodes(CAPACITY), policy.max_nodes)
    assert after <= max(policy.max_nodes, before)  # never launches past the maximum
    if memory.next_launch_at is None or now >= memory.next_launch_at:
        assert after >= floor  # never below the floor while launches are allowed
    if any(isinstance(a, Drain) for a in decision.actions):
        assert after >= floor


@given(policies, st.lists(node_states, max_size=8, unique_by=lambda n: n.name), memories, st.floats(0, 400))
def test_work_in_flight_is_never_drained_or_killed(policy, nodes, memory, now):
    by_name = {n.name: n for n in nodes}
    for action in decide(policy, CAPACITY, nodes, memory, now).actions:
        if isinstance(action, Drain):
            assert by_name[action.name].in_flight == 0 and by_name[action.name].status == "active"
        if isinstance(action, Terminate):
            node = by_name[action.name]
            assert node.managed
            assert node.status in ("provisioning", "registering", "dead") or (node.status == "draining"
                                                                               and node.drained_idle)


@given(policies, st.lists(node_states, max_size=8, unique_by=lambda n: n.name), memories, st.floats(0, 400))
def test_no_scaling_against_the_last_move_inside_the_cooldown(policy, nodes, memory, now):
    decision = decide(policy, CAPACITY, nodes, memory, now)
    recent = [t for t in (memory.last_scale_up_at, memory.last_scale_down_at) if t is not None]
    if any(now - t < policy.cooldown_s for t in recent):
        assert not any(isinstance(a, Drain) for a in decision.actions)
        # launches inside a cooldown are only replacements and the floor, never load-driven growth
        assert all(a.replaces or a.reason == "below the floor" for a in launches(decision))


@given(policies, st.lists(st.tuples(st.floats(0, 2), st.sampled_from([0.0, 2.0])), min_size=5, max_size=40))
def test_a_whole_run_never_flaps_inside_a_cooldown(policy, demand):
    """Ticks of a simulated pool: launches register at once, drains finish at once; the moves alternate only
    after a cooldown."""
    nodes: list[NodeState] = []
    memory, now, moves, serial = PoolMemory(), 0.0, [], 0
    for load, in_flight in demand:
        now += 7.0
        nodes = [replace(n, load=load, in_flight=in_flight) for n in nodes]
        decision = decide(policy, CAPACITY, nodes, memory, now)
        memory = decision.memory
        drained = {a.name for a in decision.actions if isinstance(a, Drain)}
        nodes = [n for n in nodes if n.name not in drained]
        for _ in launches(decision):
            serial += 1
            nodes.append(active(f"n{serial}", load, in_flight))
        kinds = {type(a).__name__ for a in decision.actions} & {"Launch", "Drain"}
        moves += [(now, kind) for kind in sorted(kinds)]
        assert len(nodes) <= policy.max_nodes
    for (t1, k1), (t2, k2) in zip(moves, moves[1:], strict=False):
        if k1 != k2 and not (k2 == "Launch" and len(nodes) < policy.floor_nodes(CAPACITY)):
            assert t2 - t1 >= policy.cooldown_s or math.isclose(t2 - t1, policy.cooldown_s)
