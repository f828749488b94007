"""The node registry on real Postgres and the NodeAgent API over real mutual TLS (in-process gRPC server)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from crosslogic import pki
from crosslogic.agent.proto import nodeagent_pb2 as pb
from crosslogic.agent.proto import nodeagent_pb2_grpc as pb_grpc
from crosslogic.store import tenancy as t
from crosslogic.xds import node_registry as nr
from crosslogic.xds.nodeagent import NodeAgentServicer, add_to_server, server_credentials


async def _catalogue(conn: asyncpg.Connection) -> str:
    await t.add_region(conn, "eu-central", "Frankfurt", [])
    await t.add_model(conn, "m1")
    return (await t.create_org(conn, "acme")).org_id


def _reg(name: str = "n1", cloud: str = "aws", reserved: str = "", version: str = "") -> nr.Registration:
    return nr.Registration(name=name, region="eu-central", cloud=cloud, spot=True, gpu_type="L40S", vram_total_gb=48,
                           vram_free_gb=40, throughput_tokens_per_sec=2000, models=("m1",), endpoint_host="10.0.0.5",
                           endpoint_port=8000, reserved_org_id=reserved, model_version=version)


async def _status(conn: asyncpg.Connection, name: str) -> str | None:
    return await conn.fetchval("SELECT status FROM nodes WHERE name = $1", name)


async def _age(conn: asyncpg.Connection, name: str, column: str, seconds: int) -> None:
    table = "node_load" if column == "last_heartbeat_at" else "nodes"
    await conn.execute(f"UPDATE {table} SET {column} = now() - make_interval(secs => $2) "  # noqa: S608 - test only
                       "WHERE node_id = (SELECT node_id FROM nodes WHERE name = $1)", name, seconds)


async def test_agent_registration_is_an_upsert_by_name_and_resets_the_node_to_active(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await _catalogue(conn)
        first = await nr.register(conn, _reg(), nr.NodeScope("pool", "aws"))
        await nr.drain(conn, first, "spot eviction (aws)")
        assert await _status(conn, "n1") == "draining"
        again = await nr.register(conn, _reg(), nr.NodeScope("pool", "aws"))
        assert again == first and await _status(conn, "n1") == "active"
        row = await conn.fetchrow("SELECT agent_managed, spot, gpu_type, throughput_tokens_per_sec FROM nodes")
        assert tuple(row) == (True, True, "L40S", 2000)
        assert await nr.heartbeat(conn, first) == "active"
        assert await nr.heartbeat(conn, "00000000-0000-0000-0000-000000000000") is None
    finally:
        await conn.close()


async def test_silent_node_goes_dead_and_is_removed_after_its_ttls(database_url):
    lifetimes = nr.Lifetimes(heartbeat_timeout_s=15, dead_after_s=60, drain_ttl_s=120, remove_after_s=3600)
    conn = await asyncpg.connect(database_url)
    try:
        await _catalogue(conn)
        await nr.register(conn, _reg(), None)
        await nr.sweep(conn, lifetimes)
        assert await _status(conn, "n1") == "active"
        await _age(conn, "n1", "last_heartbeat_at", 61)
        await nr.sweep(conn, lifetimes)
        assert await _status(conn, "n1") == "dead"
        assert await conn.fetchval("SELECT status_reason FROM nodes") == "no heartbeat"
        await _age(conn, "n1", "status_changed_at", 3601)
        await nr.sweep(conn, lifetimes)
        assert await _status(conn, "n1") is None
    finally:
        await conn.close()


async def test_draining_node_is_dead_after_the_drain_ttl(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await _catalogue(conn)
        node_id = await nr.register(conn, _reg(), None)
        await nr.drain(conn, node_id, "upgrade")
        await _age(conn, "n1", "status_changed_at", 121)
        await nr.sweep(conn, nr.Lifetimes(drain_ttl_s=120))
        assert await _status(conn, "n1") == "dead"
    finally:
        await conn.close()


async def test_sweep_with_nothing_to_do_sends_no_routing_notification(database_url):
    conn = await asyncpg.connect(database_url)
    listener = await asyncpg.connect(database_url)
    seen: list[str] = []
    marker = asyncio.Event()

    def on_notify(*args) -> None:
        seen.append(args[-1])
        if args[-1] == "marker":
            marker.set()

    try:
        await _catalogue(conn)
        await nr.register(conn, _reg(), None)
        await listener.add_listener("crosslogic_routing", on_notify)
        for _ in range(3):
            await nr.sweep(conn, nr.Lifetimes())
        await conn.execute("SELECT pg_notify('crosslogic_routing', 'marker')")
        await asyncio.wait_for(marker.wait(), 10)
        assert seen == ["marker"]
    finally:
        await listener.close()
        await conn.close()


async def test_model_upgrade_drains_old_versions_only_where_the_new_version_is_active(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await _catalogue(conn)
        await t.add_region(conn, "us-east", "Virginia", [])
        await nr.register(conn, _reg("old-eu", version="v1"), None)
        await nr.register(conn, dataclasses.replace(_reg("old-us", version="v1"), region="us-east"), None)
        assert await nr.drain_old_versions(conn, "m1", "v2") == []  # no v2 anywhere yet: nothing drained
        await nr.register(conn, _reg("new-eu", version="v2"), None)
        assert await nr.drain_old_versions(conn, "m1", "v2") == ["old-eu"]
        assert (await _status(conn, "old-eu"), await _status(conn, "old-us")) == ("draining", "active")
    finally:
        await conn.close()


@pytest.mark.parametrize(("scope", "registration", "allowed"), [
    ("pool:aws", _reg(cloud="aws"), True),
    ("pool:gcp", _reg(cloud="aws"), False),
    ("pool:aws", _reg(cloud="aws", reserved="11111111-1111-1111-1111-111111111111"), False),
    ("org:11111111-1111-1111-1111-111111111111", _reg(reserved="11111111-1111-1111-1111-111111111111"), True),
    ("org:22222222-2222-2222-2222-222222222222", _reg(reserved="11111111-1111-1111-1111-111111111111"), False),
    ("org:11111111-1111-1111-1111-111111111111", _reg(cloud="aws"), False),
])
def test_a_node_certificate_cannot_claim_another_scope(scope, registration, allowed):
    if allowed:
        nr.check_scope(nr.NodeScope.parse(scope), registration, None)
    else:
        with pytest.raises(nr.ScopeViolation):
            nr.check_scope(nr.NodeScope.parse(scope), registration, None)


def test_a_node_cannot_take_over_a_name_registered_in_another_scope():
    existing = {"cloud": "gcp", "reserved_org_id": None}
    with pytest.raises(nr.ScopeViolation, match="belongs to another scope"):
        nr.check_scope(nr.NodeScope("pool", "aws"), _reg(cloud="aws"), existing)


def _client_creds(ca_dir: Path, node: pki.Issued | None) -> grpc.ChannelCredentials:
    ca = (ca_dir / pki.CA_CERT).read_bytes()
    if node is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=node.key_pem, certificate_chain=node.cert_pem)


@dataclasses.dataclass(frozen=True)
class MtlsServer:
    pool: asyncpg.Pool
    port: int
    ca: pki.Issued
    org_id: str


@contextlib.asynccontextmanager
async def _mtls_server(database_url: str, tmp_path: Path) -> AsyncIterator[MtlsServer]:
    """The NodeAgent API over real mutual TLS, in process, with the catalogue of _catalogue."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    server = grpc.aio.server()
    try:
        async with pool.acquire() as conn:
            org_id = await _catalogue(conn)
        pki.init_pki(tmp_path / "pki", ["127.0.0.1"])
        add_to_server(server, NodeAgentServicer(pool, tls=True, heartbeat_interval_ms=5000, metrics_interval_ms=15000))
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tmp_path / "pki"))
        await server.start()
        yield MtlsServer(pool, port, pki.load_ca(tmp_path / "pki"), org_id)
    finally:
        await server.stop(0)
        await pool.close()


async def test_nodeagent_api_over_mutual_tls_admits_only_certificates_of_our_ca_within_their_scope(
        database_url, tmp_path):
    async with _mtls_server(database_url, tmp_path) as srv:
        pool, port, ca, org_id = srv.pool, srv.port, srv.ca, srv.org_id
        request = pb.RegisterNodeRequest(name="n1", region="eu-central", cloud="aws", models=["m1"],
                                         endpoint_host="10.0.0.5", endpoint_port=8000)

        async def register(node: pki.Issued | None, req: pb.RegisterNodeRequest = request):
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", _client_creds(tmp_path / "pki", node)) as chan:
                return await pb_grpc.NodeAgentStub(chan).RegisterNode(req, timeout=5)

        rogue_ca = pki.create_ca("someone else's CA")
        for bad in (None, pki.issue_node(rogue_ca, "n1", "pool:aws")):  # no certificate; a foreign CA's
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await register(bad)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await register(pki.issue_node(ca, "n1", f"org:{org_id}"))  # an org lane cert claiming the pool
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not register" in refused.value.details()
        answer = await register(pki.issue_node(ca, "n1", "pool:aws"))
        assert answer.node_id and answer.heartbeat_interval_ms == 5000
        async with pool.acquire() as conn:
            assert await _status(conn, "n1") == "active"


async def test_ttft_baseline_follows_normal_latency_but_not_spikes(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await _catalogue(conn)
        node_id = await nr.register(conn, _reg(), None)
        baseline = "SELECT ttft_baseline_s FROM node_load"
        assert await nr.record_metrics(conn, node_id, 1, 0, 0.1, 10, 0.0)
        assert await conn.fetchval(baseline) is None  # no requests yet: no baseline
        await nr.record_metrics(conn, node_id, 1, 0, 0.1, 10, 0.10)
        await nr.record_metrics(conn, node_id, 1, 0, 0.1, 10, 0.15)
        assert await conn.fetchval(baseline) == pytest.approx(0.11)
        await nr.record_metrics(conn, node_id, 1, 0, 0.1, 10, 2.0)  # a spike leaves the yardstick alone
        assert await conn.fetchval(baseline) == pytest.approx(0.11)
        assert await conn.fetchval("SELECT ttft_s FROM node_load") == 2.0
    finally:
        await conn.close()


_SNAPSHOT = """SELECT n.status, n.status_reason, l.last_heartbeat_at, l.engine_healthy, l.requests_running, l.metrics_at
FROM nodes n JOIN node_load l USING (node_id) WHERE n.node_id = $1::uuid"""


async def test_a_certificate_of_one_scope_cannot_act_for_a_node_of_another_scope(database_url, tmp_path):
    """Issue 9 item 14: every NodeAgent call checks the node against the caller's certificate, not only
    RegisterNode. A pool:gcp certificate, and an org lane certificate, try each call on an aws pool node."""
    async with _mtls_server(database_url, tmp_path) as srv:
        pool, port, ca, org_id = srv.pool, srv.port, srv.ca, srv.org_id
        owner, gcp, lane = (pki.issue_node(ca, "n", scope) for scope in ("pool:aws", "pool:gcp", f"org:{org_id}"))

        def channel(cert: pki.Issued) -> grpc.aio.Channel:
            return grpc.aio.secure_channel(f"127.0.0.1:{port}", _client_creds(tmp_path / "pki", cert))

        async with channel(owner) as chan:
            stub = pb_grpc.NodeAgentStub(chan)
            node_id = (await stub.RegisterNode(pb.RegisterNodeRequest(
                name="aws-1", region="eu-central", cloud="aws", models=["m1"], endpoint_host="10.0.0.5",
                endpoint_port=8000), timeout=5)).node_id
            await stub.SendMetrics(pb.MetricsRequest(node_id=node_id, requests_running=3, mean_ttft_s=0.2), timeout=5)
        async with pool.acquire() as conn:
            before = dict(await conn.fetchrow(_SNAPSHOT, node_id))
        assert before["status"] == "active" and before["requests_running"] == 3

        calls = {
            "heartbeat": lambda s: s.SendHeartbeat(pb.HeartbeatRequest(node_id=node_id, engine_unhealthy=True),
                                                   timeout=5),
            "metrics": lambda s: s.SendMetrics(pb.MetricsRequest(node_id=node_id, requests_running=99), timeout=5),
            "spot eviction": lambda s: s.NotifySpotEviction(pb.SpotEvictionRequest(node_id=node_id, provider="aws"),
                                                            timeout=5),
            "drain": lambda s: s.Shutdown(pb.ShutdownRequest(node_id=node_id, reason="x", final=False), timeout=5),
            "shutdown": lambda s: s.Shutdown(pb.ShutdownRequest(node_id=node_id, reason="x", final=True), timeout=5),
        }
        for intruder in (gcp, lane):
            async with channel(intruder) as chan:
                stub = pb_grpc.NodeAgentStub(chan)
                for name, call in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call(stub)
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
                    assert "does not cover node" in refused.value.details(), name
        async with pool.acquire() as conn:
            assert dict(await conn.fetchrow(_SNAPSHOT, node_id)) == before  # untouched, to the microsecond

        async with channel(owner) as chan:  # the node's own certificate still may do all of it
            stub = pb_grpc.NodeAgentStub(chan)
            assert (await calls["heartbeat"](stub)).status == "active"
            await calls["drain"](stub)
            async with pool.acquire() as conn:
                assert (await conn.fetchrow(_SNAPSHOT, node_id))["status"] == "draining"
            await calls["shutdown"](stub)
            unknown = "00000000-0000-0000-0000-000000000000"
            for bad in (unknown, "not-a-uuid"):
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.SendHeartbeat(pb.HeartbeatRequest(node_id=bad), timeout=5)
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        async with pool.acquire() as conn:
            assert (await conn.fetchrow(_SNAPSHOT, node_id))["status"] == "dead"


async def test_registry_calls_pin_the_write_to_the_owner_the_scope_allowed(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        org_id = await _catalogue(conn)
        lane_node = await nr.register(conn, _reg(name="lane-1", reserved=org_id), nr.NodeScope("org", org_id))
        for call in (lambda s: nr.heartbeat(conn, lane_node, True, s),
                     lambda s: nr.record_metrics(conn, lane_node, 1, 0, 0, 0, 0, s),
                     lambda s: nr.drain(conn, lane_node, "x", s), lambda s: nr.shut_down(conn, lane_node, "x", s)):
            with pytest.raises(nr.ScopeViolation):
                await call(nr.NodeScope("pool", "aws"))  # same cloud, but the node is an org's lane
        assert await _status(conn, "lane-1") == "active"
        assert await nr.heartbeat(conn, lane_node, True, nr.NodeScope("org", org_id)) == "active"
        # The owner changed between the check and the write: the pinned write finds nothing.
        pin = await nr.owner_pin(conn, uuid.UUID(lane_node), nr.NodeScope("org", org_id))
        await conn.execute("UPDATE nodes SET reserved_org_id = NULL WHERE node_id = $1::uuid", lane_node)
        await conn.execute(nr.SQL_DRAIN, uuid.UUID(lane_node), "x", *pin)
        assert await _status(conn, "lane-1") == "active"
    finally:
        await conn.close()
