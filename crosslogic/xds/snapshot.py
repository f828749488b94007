"""Pure function: node pools + gateway settings -> an immutable, versioned set of xDS resources.

Each resource type carries a version that is a hash of its content, so a rebuilt but unchanged type
is never pushed again, and versions cannot collide across control-plane restarts (DESIGN.md §4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from google.protobuf import any_pb2
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


def canonical(message: Message) -> Message:
    """`message` with every nested Any re-packed deterministically, in place.

    `SerializeToString(deterministic=True)` orders the maps of the message itself, but an Any's `value` is bytes
    packed when the resource was built, and a Struct inside it (the usage log's `json_format`, filter metadata)
    is a map serialised in hash-seed order: the same listener hashed differently in every xDS process, so
    replicas announced different versions for one config (tests/test_scaleout.py) and a restart pushed again."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if isinstance(value, Message):
            items = [value]
        elif field.message_type.GetOptions().map_entry:
            items = list(value.values())
        else:
            items = list(value)
        for item in items:
            if isinstance(item, Message):
                _canonical_one(item)
    return message


def _canonical_one(item: Message) -> None:
    if isinstance(item, any_pb2.Any) and item.type_url:
        from google.protobuf import symbol_database

        inner = symbol_database.Default().GetSymbol(item.type_url.rsplit("/", 1)[-1])()
        item.Unpack(inner)
        canonical(inner)
        item.value = inner.SerializeToString(deterministic=True)
    else:
        canonical(item)


def _typed(named: list[tuple[str, Message]], *, has_any: bool = True) -> TypedResources:
    """`has_any`: the type may hold Any fields (listeners, routes, clusters); endpoints never do, and with 10,000
    of them the walk would cost the scheduler's rebuild time."""
    digest = hashlib.sha256()
    by_name: dict[str, any_pb2.Any] = {}
    for name, message in sorted(named, key=lambda item: item[0]):
        if has_any:
            canonical(message)
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
        ENDPOINT_TYPE: _typed([(p.cluster_name, resources.build_load_assignment(p)) for p in pools], has_any=False),
    })
