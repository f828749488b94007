"""Snapshot building and the ADS protocol state machine, without gRPC or Envoy."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from crosslogic.xds.model import EndpointHealth, GatewaySettings, Pool, PoolEndpoint
from crosslogic.xds.node_registry import Lifetimes
from crosslogic.xds.policy import RegionPolicy, RoutingPolicy
from crosslogic.xds.registry import assemble_pools, node_view
from crosslogic.xds.server import _Stream
from crosslogic.xds.snapshot import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, build_snapshot

SETTINGS = GatewaySettings(listen_port=18080)


def pool(*ports: int, health: EndpointHealth = EndpointHealth.HEALTHY) -> Pool:
    return Pool("ap-south", "llama-3-8b", tuple(PoolEndpoint(f"n{p}", "10.0.0.1", p, health=health) for p in ports))


def test_unchanged_state_gives_identical_versions_across_rebuilds():
    first, second = build_snapshot([pool(1, 2)], SETTINGS), build_snapshot([pool(1, 2)], SETTINGS)
    assert {t: first.version(t) for t in first.types} == {t: second.version(t) for t in second.types}


def test_an_endpoint_change_moves_only_the_endpoint_version():
    before, after = build_snapshot([pool(1, 2)], SETTINGS), build_snapshot([pool(1, 3)], SETTINGS)
    assert before.version(ENDPOINT_TYPE) != after.version(ENDPOINT_TYPE)
    for unchanged in (CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE):
        assert before.version(unchanged) == after.version(unchanged)


def test_clusters_never_fall_into_panic_mode_and_retry_budget_is_set():
    cluster = cluster_pb2.Cluster()
    build_snapshot([pool(1)], SETTINGS).resources(CLUSTER_TYPE)[0].Unpack(cluster)
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0
    assert cluster.circuit_breakers.thresholds[0].retry_budget.budget_percent.value > 0


def test_draining_nodes_are_sent_as_draining():
    cla = endpoint_pb2.ClusterLoadAssignment()
    build_snapshot([pool(1, health=EndpointHealth.DRAINING)], SETTINGS).resources(ENDPOINT_TYPE)[0].Unpack(cla)
    assert cla.endpoints[0].lb_endpoints[0].health_status == health_check_pb2.DRAINING


def test_fallback_regions_become_lower_priorities():
    nodes = [
        {"node_id": "a", "region": "ap-south", "endpoint_host": "h", "endpoint_port": 1, "weight": 100,
         "status": "active", "model_list": ["m"]},
        {"node_id": "b", "region": "ap-southeast", "endpoint_host": "h", "endpoint_port": 2, "weight": 100,
         "status": "active", "model_list": ["m"]},
    ]
    policy = RoutingPolicy({"ap-south": ("ap-southeast",), "ap-southeast": ()}, {"*": RegionPolicy()})
    pools = assemble_pools([node_view(n, Lifetimes()) for n in nodes], policy, {"m": 1000.0})
    by_name = {p.cluster_name: p for p in pools}
    assert [(e.node_id, e.priority) for e in by_name["ap-south/m"].endpoints] == [("a", 0), ("b", 1)]
    assert [(e.node_id, e.priority) for e in by_name["ap-southeast/m"].endpoints] == [("b", 0)]


def test_models_without_any_node_get_no_pool():
    assert assemble_pools([], RoutingPolicy({"ap-south": ()}, {"*": RegionPolicy()}), {"m": 1000.0}) == []


def _request(type_url: str, nonce: str = "", names: tuple[str, ...] = (), error: str = ""):
    request = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce, resource_names=list(names))
    if error:
        request.error_detail.message = error
        request.error_detail.code = 3
    return request


def test_ads_answers_first_request_then_waits_after_ack():
    snapshot = build_snapshot([pool(1)], SETTINGS)
    stream = _Stream(cache=None)
    assert stream.on_request(_request(CLUSTER_TYPE), snapshot) == [CLUSTER_TYPE]
    sent = stream.response(CLUSTER_TYPE, snapshot)
    assert sent.version_info == snapshot.version(CLUSTER_TYPE) and len(sent.resources) == 1
    assert stream.on_request(_request(CLUSTER_TYPE, sent.nonce), snapshot) == []  # ACK: nothing new


def test_ads_answers_a_repeated_ack_so_envoy_does_not_stall_on_eds():
    snapshot = build_snapshot([pool(1)], SETTINGS)
    stream = _Stream(cache=None)
    stream.on_request(_request(ENDPOINT_TYPE, names=("ap-south/llama-3-8b",)), snapshot)
    sent = stream.response(ENDPOINT_TYPE, snapshot)
    ack = _request(ENDPOINT_TYPE, sent.nonce, ("ap-south/llama-3-8b",))
    assert stream.on_request(ack, snapshot) == []
    assert stream.on_request(ack, snapshot) == [ENDPOINT_TYPE]  # Envoy wants the CLA again (cluster re-sent)


def test_ads_ignores_stale_nonces_and_does_not_resend_after_nack():
    snapshot = build_snapshot([pool(1)], SETTINGS)
    stream = _Stream(cache=None)
    stream.on_request(_request(CLUSTER_TYPE), snapshot)
    first = stream.response(CLUSTER_TYPE, snapshot)
    second = stream.response(CLUSTER_TYPE, snapshot)
    assert stream.on_request(_request(CLUSTER_TYPE, first.nonce), snapshot) == []  # stale
    assert stream.on_request(_request(CLUSTER_TYPE, second.nonce, error="bad cluster"), snapshot) == []


def test_a_new_snapshot_pushes_changed_types_and_resends_endpoints_with_clusters():
    old, new_cluster = build_snapshot([pool(1)], SETTINGS), build_snapshot(
        [pool(1), Pool("eu-central", "llama-3-8b", (PoolEndpoint("x", "h", 9),))], SETTINGS)
    stream = _Stream(cache=None)
    for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE):
        stream.on_request(_request(type_url), old)
        stream.response(type_url, old)
    due = stream.on_snapshot(new_cluster)
    assert due[:2] == [CLUSTER_TYPE, ENDPOINT_TYPE]


def test_a_subscription_change_sent_with_a_stale_nonce_is_answered_after_the_ack():
    # Envoy asks for the CLAs of new clusters while our next EDS push is in flight (so with an old nonce),
    # then ACKs that push: the new names must still get an answer, or the clusters stay warming forever.
    snapshot = build_snapshot([pool(1)], SETTINGS)
    stream = _Stream(cache=None)
    stream.on_request(_request(ENDPOINT_TYPE, names=("a",)), snapshot)
    first = stream.response(ENDPOINT_TYPE, snapshot)
    stream.on_request(_request(ENDPOINT_TYPE, first.nonce, ("a",)), snapshot)
    pushed = stream.response(ENDPOINT_TYPE, snapshot)  # e.g. after a snapshot change
    assert stream.on_request(_request(ENDPOINT_TYPE, first.nonce, ("a", "b")), snapshot) == []  # stale
    assert stream.on_request(_request(ENDPOINT_TYPE, pushed.nonce, ("a", "b")), snapshot) == [ENDPOINT_TYPE]


def test_ratelimit_filter_only_in_rls_admission_mode():
    from dataclasses import replace

    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

    from crosslogic.xds.resources import build_listener

    def filters(settings: GatewaySettings) -> list[str]:
        hcm = http_connection_manager_pb2.HttpConnectionManager()
        build_listener(settings).filter_chains[0].filters[0].typed_config.Unpack(hcm)
        return [f.name for f in hcm.http_filters]

    assert "envoy.filters.http.ratelimit" not in filters(SETTINGS)  # default: ext_authz reserves
    assert filters(replace(SETTINGS, admission="rls")) == [
        "envoy.filters.http.header_mutation", "envoy.filters.http.ext_authz", "envoy.filters.http.ratelimit",
        "envoy.filters.http.lua", "envoy.filters.http.router"]
