"""ADS (state-of-the-world) protocol server: nonces, ACK/NACK, pushes. Knows nothing about policy."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from crosslogic.xds import metrics
from crosslogic.xds.cache import SnapshotCache
from crosslogic.xds.snapshot import CLUSTER_TYPE, ENDPOINT_TYPE, PUSH_ORDER, Snapshot

log = logging.getLogger("crosslogic.xds")
_nonces = itertools.count(1)


@dataclass
class _TypeState:
    names: list[str] = field(default_factory=list)  # the latest subscription Envoy asked for
    sent_names: list[str] = field(default_factory=list)  # the subscription our last response answered
    sent_version: str | None = None
    sent_nonce: str = ""
    acked: bool = False


class _Stream:
    """One Envoy's ADS stream: what was sent per type and whether it was acknowledged."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.types: dict[str, _TypeState] = {}
        self.node_id = ""

    def response(self, type_url: str, snapshot: Snapshot) -> discovery_pb2.DiscoveryResponse:
        state = self.types[type_url]
        nonce = str(next(_nonces))
        state.sent_version = snapshot.version(type_url)
        state.sent_names = list(state.names)
        state.sent_nonce = nonce
        state.acked = False
        return discovery_pb2.DiscoveryResponse(
            version_info=state.sent_version,
            resources=snapshot.resources(type_url, state.names),
            type_url=type_url,
            nonce=nonce,
        )

    def on_request(self, request: discovery_pb2.DiscoveryRequest, snapshot: Snapshot) -> list[str]:
        """Returns the types to send now in answer to this request."""
        if request.node.id:
            self.node_id = request.node.id
        type_url = request.type_url
        state = self.types.setdefault(type_url, _TypeState())
        # Recorded even from a stale request: a new subscription (new clusters' CLAs) sent while our next
        # response was in flight must still be answered once Envoy ACKs that response.
        state.names = list(request.resource_names)
        if request.HasField("error_detail"):
            metrics.nacks.labels(metrics.type_name(type_url)).inc()
            log.warning("NACK from %s for %s version %s: %s", self.node_id, type_url,
                        state.sent_version, request.error_detail.message)
            state.acked = True  # Envoy keeps the old config; resend only when the snapshot changes
            return []
        if not request.response_nonce:
            return [type_url]  # first request of this type (or Envoy reconnected)
        if request.response_nonce != state.sent_nonce:
            return []  # stale: an answer to an older response; the newest is on its way
        if state.acked:
            # Envoy repeats an already-ACKed nonce when it needs the resources again (an EDS request after
            # a cluster was re-sent); answering is what avoids its 15 s stall (DESIGN.md §4).
            return [type_url]
        state.acked = True
        if state.names != state.sent_names or state.sent_version != snapshot.version(type_url):
            return [type_url]
        return []

    def on_snapshot(self, snapshot: Snapshot) -> list[str]:
        due = [t for t in PUSH_ORDER if t in self.types and self.types[t].sent_version != snapshot.version(t)]
        if CLUSTER_TYPE in due and ENDPOINT_TYPE in self.types and ENDPOINT_TYPE not in due:
            due.insert(due.index(CLUSTER_TYPE) + 1, ENDPOINT_TYPE)  # re-sent clusters need their CLAs
        return due


class StreamRefused(Exception):
    """The caller may not open an ADS stream (no admitted identity): PERMISSION_DENIED."""


# Which snapshot cache a stream reads: the cloud listener has one for every gateway; the site listener one per
# verified site identity (xds/identity.py), which raises StreamRefused for a peer it does not admit.
Resolver = Callable[[grpc.aio.ServicerContext], Awaitable[SnapshotCache]]


class AggregatedDiscoveryServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, resolve: Resolver | None = None) -> None:
        self.cache = cache
        self.resolve = resolve
        self.open_streams = 0

    async def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC name)
        cache = self.cache
        if self.resolve is not None:
            try:
                cache = await self.resolve(context)
            except StreamRefused as exc:
                log.warning("refused an ADS stream: %s", exc)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        async for response in self._serve(cache, request_iterator, context):
            yield response

    async def _serve(self, cache: SnapshotCache, request_iterator, context):
        stream = _Stream(cache)
        self.open_streams += 1
        metrics.streams.inc()
        events: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    events.put_nowait(request)
            finally:
                events.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        changes = cache.watch()
        try:
            snapshot = await cache.wait_ready()
            if snapshot is None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
            while True:
                next_request = asyncio.ensure_future(events.get())
                next_change = asyncio.ensure_future(changes.get())
                done, _ = await asyncio.wait({next_request, next_change}, return_when=asyncio.FIRST_COMPLETED)
                due: list[str] = []
                if next_change in done:
                    if (changed := next_change.result()) is None:  # the identity was revoked: cut it off
                        next_request.cancel()
                        log.warning("closing the ADS stream of %s: its certificate no longer admits it",
                                    stream.node_id)
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
                    snapshot = changed
                    due += stream.on_snapshot(snapshot)
                else:
                    next_change.cancel()
                if next_request in done:
                    request = next_request.result()
                    if request is None:
                        return
                    due += [t for t in stream.on_request(request, snapshot) if t not in due]
                else:
                    next_request.cancel()
                for type_url in due:
                    metrics.responses.labels(metrics.type_name(type_url)).inc()
                    yield stream.response(type_url, snapshot)
        finally:
            self.open_streams -= 1
            metrics.streams.dec()
            cache.unwatch(changes)
            reader.cancel()

    async def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802
        await context.abort(12, "delta xDS is not served; use state-of-the-world ADS")  # UNIMPLEMENTED
