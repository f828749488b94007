"""The NodeAgent gRPC edge: protocol messages <-> node registry calls. No SQL and no policy here."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg
import grpc

from crosslogic import pki
from crosslogic.agent.proto import nodeagent_pb2 as pb
from crosslogic.agent.proto import nodeagent_pb2_grpc as pb_grpc
from crosslogic.runtime import grpc_server
from crosslogic.xds import node_registry as registry
from crosslogic.xds.identity import IdentityRefused, site_identity

log = logging.getLogger("crosslogic.nodeagent")


def registration_from(request: pb.RegisterNodeRequest) -> registry.Registration:
    return registry.Registration(
        name=request.name, region=request.region, cloud=request.cloud or "onprem", spot=request.spot,
        gpu_type=request.gpu_type or "unknown", vram_total_gb=request.vram_total_gb,
        vram_free_gb=request.vram_free_gb, throughput_tokens_per_sec=request.throughput_tokens_per_sec,
        models=tuple(request.models), endpoint_host=request.endpoint_host, endpoint_port=request.endpoint_port,
        tailnet_ip=request.tailnet_ip, reserved_org_id=request.reserved_org_id, model_version=request.model_version,
        engine=request.engine or "vllm", prefill_tokens_per_sec=request.prefill_tokens_per_sec)


def peer_scope(context: grpc.aio.ServicerContext, tls: bool) -> registry.NodeScope | None:
    """The scope in the verified client certificate; None in plaintext mode."""
    if not tls:
        return None
    pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
    scope = pki.scope_of(pem) if pem else None
    if scope is None:
        raise registry.ScopeViolation("the client certificate carries no node scope")
    return registry.NodeScope.parse(scope)


class NodeAgentServicer(pb_grpc.NodeAgentServicer):
    """`sites`: the site listener's servicer: the caller's scope is its site certificate (checked against
    revocation on every call), so a site's agents register and act only on that site's nodes of its org."""

    def __init__(self, pool: asyncpg.Pool, *, tls: bool, heartbeat_interval_ms: int, metrics_interval_ms: int,
                 sites: bool = False) -> None:
        self.pool = pool
        self.tls = tls
        self.sites = sites
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.metrics_interval_ms = metrics_interval_ms

    async def peer_scope(self, context: grpc.aio.ServicerContext) -> registry.NodeScope | None:
        if not self.sites:
            return peer_scope(context, self.tls)
        try:
            identity = await site_identity(context, self.pool)
        except IdentityRefused as exc:
            raise registry.ScopeViolation(str(exc)) from None
        return registry.NodeScope.site(identity.site_id, identity.org_id)

    async def RegisterNode(self, request, context):  # noqa: N802 - gRPC method name
        reg = registration_from(request)
        if not reg.name or not reg.region or not reg.models or not reg.endpoint_host or not reg.endpoint_port:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "name, region, models, endpoint_host and endpoint_port are required")
        try:
            scope = await self.peer_scope(context)
            async with self.pool.acquire() as conn:
                node_id = await registry.register(conn, reg, scope)
        except registry.ScopeViolation as exc:
            log.warning("refused registration of %s: %s", reg.name, exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except asyncpg.ForeignKeyViolationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown region or org: {exc.detail or exc}")
        log.info("registered node %s (%s) in %s serving %s", reg.name, node_id, reg.region, ",".join(reg.models))
        return pb.RegisterNodeResponse(node_id=node_id, heartbeat_interval_ms=self.heartbeat_interval_ms,
                                       metrics_interval_ms=self.metrics_interval_ms)

    async def _scope(self, context: grpc.aio.ServicerContext, node_id: str, call: str) -> registry.NodeScope | None:
        try:
            return await self.peer_scope(context)
        except registry.ScopeViolation as exc:
            await self._deny(context, node_id, call, exc)

    async def _deny(self, context: grpc.aio.ServicerContext, node_id: str, call: str,
                    exc: registry.ScopeViolation) -> None:
        log.warning("refused %s for node %.40s: %s", call, node_id, exc)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    # Every call below acts on one node and checks, like RegisterNode, that the node belongs to the caller's
    # certificate scope (node_registry.owner_pin): PERMISSION_DENIED otherwise, and the node is left as it was.

    async def SendHeartbeat(self, request, context):  # noqa: N802
        scope = await self._scope(context, request.node_id, "heartbeat")
        try:
            async with self.pool.acquire() as conn:
                status = await registry.heartbeat(conn, request.node_id, not request.engine_unhealthy, scope)
        except registry.ScopeViolation as exc:
            await self._deny(context, request.node_id, "heartbeat", exc)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown node: register again")
        return pb.HeartbeatResponse(status=status)

    async def SendMetrics(self, request, context):  # noqa: N802
        scope = await self._scope(context, request.node_id, "metrics")
        try:
            async with self.pool.acquire() as conn:
                known = await registry.record_metrics(conn, request.node_id, request.requests_running,
                                                      request.requests_waiting, request.kv_cache_usage,
                                                      request.generation_tokens_per_sec, request.mean_ttft_s, scope)
        except registry.ScopeViolation as exc:
            await self._deny(context, request.node_id, "metrics", exc)
        if not known:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown node: register again")
        # No push from here: the scheduler's tick picks the new load up (thousands of agents must not
        # each trigger a rebuild).
        return pb.MetricsResponse()

    async def NotifySpotEviction(self, request, context):  # noqa: N802
        scope = await self._scope(context, request.node_id, "spot eviction")
        try:
            async with self.pool.acquire() as conn:
                await registry.drain(conn, request.node_id, f"spot eviction ({request.provider})", scope)
        except registry.ScopeViolation as exc:
            await self._deny(context, request.node_id, "spot eviction", exc)
        log.warning("spot eviction notice for node %s from %s: %s", request.node_id, request.provider, request.detail)
        return pb.SpotEvictionResponse()

    async def Shutdown(self, request, context):  # noqa: N802
        scope = await self._scope(context, request.node_id, "shutdown")
        reason = request.reason or "agent shutdown"
        try:
            async with self.pool.acquire() as conn:
                if request.final:
                    await registry.shut_down(conn, request.node_id, reason, scope)
                else:
                    await registry.drain(conn, request.node_id, reason, scope)
        except registry.ScopeViolation as exc:
            await self._deny(context, request.node_id, "shutdown", exc)
        return pb.ShutdownResponse()


def server_credentials(pki_dir: Path) -> grpc.ServerCredentials:
    """Mutual TLS: only clients with a certificate from the control-plane CA get through the handshake."""
    return grpc_server.server_credentials((pki_dir / pki.SERVER_CERT).read_bytes(),
                                          (pki_dir / pki.SERVER_KEY).read_bytes(), (pki_dir / pki.CA_CERT).read_bytes())


def add_to_server(server: grpc.aio.Server, servicer: NodeAgentServicer) -> None:
    pb_grpc.add_NodeAgentServicer_to_server(servicer, server)
