"""The scheduler's pure parts: scorers and weights, node health, policy validation, pool assembly,
agent-side parsing of vLLM metrics and spot notices."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crosslogic.agent import spot
from crosslogic.agent.engine import Backoff
from crosslogic.agent.metrics import mean_ttft, parse_vllm_metrics, tokens_per_sec
from crosslogic.xds.model import EndpointHealth
from crosslogic.xds.node_registry import Lifetimes
from crosslogic.xds.policy import PolicyRejected, RegionPolicy, RoutingPolicy, validate
from crosslogic.xds.registry import NodeView, assemble_pools, latency_spike, node_health
from crosslogic.xds.scoring import BASE_WEIGHT, NodeLoad, eds_weight, headroom

WEIGHTS = {"queue": 0.5, "kv_cache": 0.3, "throughput": 0.2}
loads = st.builds(NodeLoad, requests_running=st.floats(0, 1000), requests_waiting=st.floats(0, 1000),
                  kv_cache_usage=st.floats(0, 1), tokens_per_sec=st.floats(0, 1e5),
                  capacity_tokens_per_sec=st.floats(0, 1e5))
score_weights = st.dictionaries(st.sampled_from(["queue", "kv_cache", "throughput"]), st.floats(0, 10), min_size=1)


@given(loads, score_weights, st.integers(1, 1000))
def test_headroom_is_always_between_zero_and_one(load, weights, queue_capacity):
    assert 0.0 <= headroom(load, weights, queue_capacity) <= 1.0


@given(loads, score_weights, st.integers(1, 1000), st.floats(1, 1e5))
def test_every_node_keeps_a_weight_of_at_least_one_and_at_most_ten_times_base(load, weights, cap, reference):
    assert 1 <= eds_weight(load, weights, cap, reference) <= 10 * BASE_WEIGHT


@given(loads, st.floats(0, 1000), st.floats(0, 1))
def test_more_queue_or_more_kv_cache_use_never_raises_the_weight(load, extra_waiting, extra_kv):
    heavier = NodeLoad(load.requests_running, load.requests_waiting + extra_waiting,
                       min(1.0, load.kv_cache_usage + extra_kv), load.tokens_per_sec, load.capacity_tokens_per_sec)
    assert eds_weight(heavier, WEIGHTS, 16, 1000) <= eds_weight(load, WEIGHTS, 16, 1000)


def test_idle_node_twice_as_fast_gets_twice_the_weight():
    slow = NodeLoad(capacity_tokens_per_sec=1000)
    fast = NodeLoad(capacity_tokens_per_sec=2000)
    assert eds_weight(fast, WEIGHTS, 16, 1000) == 2 * eds_weight(slow, WEIGHTS, 16, 1000) == 2 * BASE_WEIGHT


@pytest.mark.parametrize(("load", "expected"), [
    (NodeLoad(), 100),                                                  # idle
    (NodeLoad(requests_waiting=16), 50),                                # queue full: the queue scorer is 0
    (NodeLoad(kv_cache_usage=1.0), 70),                                 # KV cache full
    (NodeLoad(tokens_per_sec=1000, capacity_tokens_per_sec=1000), 80),  # decoding at capacity
    (NodeLoad(requests_waiting=16, kv_cache_usage=1.0, tokens_per_sec=1000, capacity_tokens_per_sec=1000), 1),
])
def test_weight_table(load, expected):
    assert eds_weight(load, WEIGHTS, 16, 1000) == expected


@pytest.mark.parametrize(("status", "agent", "age", "health"), [
    ("active", False, None, EndpointHealth.HEALTHY),     # operator-added node: its status is the truth
    ("active", True, 2.0, EndpointHealth.HEALTHY),
    ("active", True, 16.0, EndpointHealth.UNHEALTHY),    # missed heartbeats for 15 s
    ("active", True, None, EndpointHealth.UNHEALTHY),
    ("draining", True, 1.0, EndpointHealth.DRAINING),
    ("draining", False, None, EndpointHealth.DRAINING),
])
def test_node_health_follows_status_and_heartbeats(status, agent, age, health):
    assert node_health(status, agent, age, Lifetimes(heartbeat_timeout_s=15)) is health


REGIONS = {"ap-south": ("ap-southeast", "eu-central"), "ap-southeast": ("ap-south",), "eu-central": ()}


def _row(region="*", **overrides):
    row = {"region": region, "pinning": "fallback", "spill_share": 1.0, "retries": 2,
           "score_weights": {"queue": 1.0}, "queue_capacity": 16}
    return {**row, **overrides}


def test_valid_policy_is_accepted_with_region_overrides():
    policy = validate([_row(), _row("ap-south", pinning="strict", retries=4)], REGIONS)
    assert policy.for_region("ap-south").pinning == "strict" and policy.for_region("ap-south").retries == 4
    assert policy.for_region("eu-central").pinning == "fallback"


@pytest.mark.parametrize(("row", "regions", "message"), [
    (_row(pinning="sometimes"), REGIONS, "pinning must be one of strict, fallback"),
    (_row(spill_share=1.5), REGIONS, "spill_share must be between 0 and 1"),
    (_row(retries=99), REGIONS, "retries must be 0..10"),
    (_row(score_weights={"qeueu": 1.0}), REGIONS, "unknown scorers qeueu"),
    (_row(score_weights={"queue": 0}), REGIONS, "at least one score weight must be positive"),
    (_row(score_weights={"queue": -1}), REGIONS, "score weights must be numbers >= 0"),
    (_row("mars"), REGIONS, "unknown or disabled region 'mars'"),
    (_row(), {**REGIONS, "eu-central": ("us-west",)}, "fallback region 'us-west' is unknown"),
    (_row(), {**REGIONS, "eu-central": ("eu-central",)}, "names the region itself"),
])
def test_bad_policy_is_rejected_with_a_clear_message(row, regions, message):
    with pytest.raises(PolicyRejected, match=message):
        validate([row], regions)


def _node(name, region, health=EndpointHealth.HEALTHY, load=None):
    return NodeView(node_id=name, region=region, host="10.0.0.1", port=8000, models=("m",), health=health, load=load)


def test_fallback_regions_become_lower_priorities_and_strict_pinning_has_none():
    nodes = [_node("a", "ap-south"), _node("b", "ap-southeast"), _node("c", "eu-central")]
    fallback = RoutingPolicy(REGIONS, {"*": RegionPolicy()})
    pool = {p.cluster_name: p for p in assemble_pools(nodes, fallback, {"m": 1000.0})}["ap-south/m"]
    assert [(e.node_id, e.priority) for e in pool.endpoints] == [("a", 0), ("b", 1), ("c", 2)]
    strict = RoutingPolicy(REGIONS, {"*": RegionPolicy(), "ap-south": RegionPolicy(pinning="strict", retries=5)})
    pool = {p.cluster_name: p for p in assemble_pools(nodes, strict, {"m": 1000.0})}["ap-south/m"]
    assert [(e.node_id, e.priority) for e in pool.endpoints] == [("a", 0)] and pool.retries == 5


def test_busy_node_gets_a_lower_weight_than_an_idle_one_in_the_same_pool():
    nodes = [_node("idle", "eu-central", load=NodeLoad()),
             _node("busy", "eu-central", load=NodeLoad(requests_waiting=12, kv_cache_usage=0.9))]
    pools = assemble_pools(nodes, RoutingPolicy(REGIONS, {"*": RegionPolicy()}), {"m": 1000.0})
    (pool,) = [p for p in pools if p.cluster_name == "eu-central/m"]
    weights = {e.node_id: e.weight for e in pool.endpoints}
    assert weights["busy"] < weights["idle"] == BASE_WEIGHT


VLLM_METRICS = """
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1200.0
"""


def test_agent_reads_vllm_load_and_decode_rate_from_metrics():
    first = parse_vllm_metrics(VLLM_METRICS, at=10.0)
    assert (first.requests_running, first.requests_waiting, first.kv_cache_usage) == (3.0, 7.0, 0.25)
    later = parse_vllm_metrics(VLLM_METRICS.replace("1200.0", "1500.0"), at=12.0)
    assert tokens_per_sec(first, later) == 150.0
    assert tokens_per_sec(later, first) == 0.0  # restarted engine (counter reset): no negative rates


@pytest.mark.parametrize(("parse", "status", "body", "noticed"), [
    (spot.parse_aws, 404, "", False),
    (spot.parse_aws, 200, '{"action": "terminate", "time": "2026-11-27T20:00:00Z"}', True),
    (spot.parse_gcp, 200, "FALSE", False),
    (spot.parse_gcp, 200, "TRUE", True),
    (spot.parse_azure, 200, '{"DocumentIncarnation": 1, "Events": []}', False),
    (spot.parse_azure, 200, '{"Events": [{"EventType": "Preempt", "NotBefore": "soon"}]}', True),
    (spot.parse_azure, 200, '{"Events": [{"EventType": "Freeze"}]}', False),
])
def test_spot_notices_of_each_cloud_are_recognised(parse, status, body, noticed):
    assert (parse(status, body) is not None) == noticed


@pytest.mark.parametrize(("failures", "seconds"), [(0, 1), (1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (100, 60)])
def test_engine_restart_backoff_doubles_from_one_second_up_to_a_minute(failures, seconds):
    assert Backoff(initial_s=1, maximum_s=60).delay(failures) == seconds  # 1, 2, 4 ... 32, then capped (64 > 60)


@given(st.integers(1, 100))
def test_engine_restart_backoff_grows_and_is_capped(failures):
    backoff = Backoff(initial_s=1, maximum_s=60)
    assert 1 <= backoff.delay(failures) <= backoff.delay(failures + 1) <= 60
    assert backoff.delay(failures) == min(60, 2 ** (failures - 1))


def test_reserved_lane_puts_the_orgs_nodes_first_and_the_shared_pool_after_them():
    nodes = [_node("shared-home", "ap-south"), _node("shared-away", "ap-southeast"),
             replace(_node("mine", "ap-south"), reserved_org="org-1")]
    pools = {p.cluster_name: p for p in assemble_pools(nodes, RoutingPolicy(REGIONS, {"*": RegionPolicy()}),
                                                       {"m": 1000.0})}
    assert [e.node_id for e in pools["ap-south/m"].endpoints] == ["shared-home", "shared-away"]
    lane = pools["ap-south/m@org-1"]
    assert [(e.node_id, e.priority) for e in lane.endpoints] == [("mine", 0), ("shared-home", 3), ("shared-away", 4)]


def test_spill_throttle_splits_a_pool_into_a_spilling_route_and_a_local_only_route():
    from crosslogic.xds.model import GatewaySettings
    from crosslogic.xds.resources import build_route_configuration

    nodes = [_node("home", "ap-south"), _node("away", "ap-southeast")]
    policy = RoutingPolicy(REGIONS, {"*": RegionPolicy(), "ap-south": RegionPolicy(spill_share=0.2)})
    pools = [p for p in assemble_pools(nodes, policy, {"m": 1000.0}) if p.region == "ap-south"]
    assert {p.cluster_name: [e.node_id for e in p.endpoints] for p in pools} == {
        "ap-south/m": ["home", "away"], "ap-south/m#local": ["home"]}
    routes = {r.name: r for r in build_route_configuration(pools, GatewaySettings()).virtual_hosts[0].routes}
    spill, local = routes["ap-south/m/spill"], routes["ap-south/m/local"]
    assert spill.match.runtime_fraction.default_value.numerator == 2000 and spill.route.cluster == "ap-south/m"
    assert local.route.cluster == "ap-south/m#local"
    assert spill.match.headers[0].string_match.exact == local.match.headers[0].string_match.exact == "ap-south/m"


@pytest.mark.parametrize(("ttft", "baseline", "spike"), [
    (0.0, 0.01, False),     # no requests in the interval
    (0.5, None, False),     # no baseline yet
    (0.02, 0.005, False),   # 4x, but only 15 ms: jitter on a fast node
    (0.5, 0.01, True),      # 50x
    (0.35, 0.1, True),      # 3.5x and 250 ms
    (0.29, 0.1, False),     # 2.9x
])
def test_latency_spike_is_three_times_the_baseline_and_clearly_above_it(ttft, baseline, spike):
    assert latency_spike(ttft, baseline) is spike


def test_agent_computes_mean_ttft_between_two_scrapes():
    text = VLLM_METRICS + (
        "# TYPE vllm:time_to_first_token_seconds histogram\n"
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} SUM\n'
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} COUNT\n')
    first = parse_vllm_metrics(text.replace("SUM", "1.0").replace("COUNT", "10.0"), at=1.0)
    later = parse_vllm_metrics(text.replace("SUM", "3.0").replace("COUNT", "14.0"), at=2.0)
    assert mean_ttft(first, later) == 0.5
    assert mean_ttft(later, later) == 0.0 and mean_ttft(None, later) == 0.0
