"""Pure function: node pools + gateway settings -> an immutable, versioned set of xDS resources.

Each resource type carries a version that is a hash of its content, so a rebuilt but unchanged type
is never pushed again, and versions cannot collide across control-plane restarts (DESIGN.md §4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from crosslogic.xds import resources
from crosslogic.xds.model import GatewaySettings, Pool

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# The order Envoy wants updates in over one ADS stream: clusters before their endpoints, listeners before routes.
PUSH_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)


@dataclass(frozen=True)
class TypedResources:
    version: str
    by_name: dict[str, any_pb2.Any]


@dataclass(frozen=True)
class Snapshot:
    types: dict[str, TypedResources]

    def version(self, type_url: str) -> str:
        return self.types[type_url].version if type_url in self.types else ""

    def resources(self, type_url: str, names: list[str] | None = None) -> list[any_pb2.Any]:
        typed = self.types.get(type_url)
        if typed is None:
            return []
        if not names:  # wildcard subscription
            return list(typed.by_name.values())
        return [typed.by_name[n] for n in names if n in typed.by_name]


def _repack_anys(message: Message) -> None:
    """Re-serialises every nested Any deterministically, in place. json_format packs an Any with plain
    serialisation, whose order of map entries (a Struct's fields: the usage log's json_format) follows a
    per-process hash seed: two xDS replicas built different bytes, so different versions, from the same state,
    and Envoy updated its listener in place on every reconnect to the other replica."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        else:
            items = [value] if isinstance(value, Message) else list(value)
        for item in items:
            if isinstance(item, any_pb2.Any):
                inner = message_factory.GetMessageClass(
                    descriptor_pool.Default().FindMessageTypeByName(item.TypeName()))()
                item.Unpack(inner)
                _repack_anys(inner)
                item.Pack(inner, deterministic=True)
            else:
                _repack_anys(item)


def _typed(named: list[tuple[str, Message]]) -> TypedResources:
    digest = hashlib.sha256()
    by_name: dict[str, any_pb2.Any] = {}
    for name, message in sorted(named, key=lambda item: item[0]):
        _repack_anys(message)
        packed = any_pb2.Any()
        packed.Pack(message, deterministic=True)
        by_name[name] = packed
        digest.update(name.encode())
        digest.update(message.SerializeToString(deterministic=True))
    return TypedResources(version=digest.hexdigest()[:16], by_name=by_name)


def build_snapshot(pools: list[Pool], settings: GatewaySettings) -> Snapshot:
    listeners = [(resources.LISTENER_NAME, resources.build_listener(settings))]
    for index, (host, port) in enumerate(settings.extra_listeners):
        name = f"{resources.LISTENER_NAME}-{index + 1}"
        listeners.append((name, resources.build_listener(settings, name, host, port)))
    return Snapshot(types={
        LISTENER_TYPE: _typed(listeners),
        ROUTE_TYPE: _typed([(resources.ROUTE_CONFIG_NAME, resources.build_route_configuration(pools, settings))]),
        CLUSTER_TYPE: _typed([(p.cluster_name, resources.build_cluster(p)) for p in pools]),
        ENDPOINT_TYPE: _typed([(p.cluster_name, resources.build_load_assignment(p)) for p in pools]),
    })
