"""One access-log entry -> one usage record. Pure: tested without gRPC or Postgres."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.json_format import MessageToDict

AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
USAGE_NAMESPACE = "crosslogic.usage"


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    occurred_at: datetime
    org_id: str
    env_id: str
    key_id: str
    region: str
    model: str
    endpoint: str
    streamed: bool
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    usage_source: str  # 'reported' | 'partial' (stream cut short) | 'none'
    latency_ms: int
    node: str | None  # internal: upstream address, never shown to tenants

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _struct(entry, namespace: str) -> dict:
    metadata = entry.common_properties.metadata.filter_metadata
    return MessageToDict(metadata[namespace]) if namespace in metadata else {}


def _address(address) -> str | None:
    socket = address.socket_address
    return f"{socket.address}:{socket.port_value}" if socket.address else None


def record_from_fields(request_id: str, occurred_at: datetime, authz: dict, usage: dict, status_code: int,
                       latency_ms: int, node: str | None) -> UsageRecord | None:
    """The one place that turns log fields into a record; the gRPC and the file access log both use it.

    None for requests that never passed authorisation or named no model (nothing to bill).
    """
    if not authz.get("model") or not authz.get("org_id") or not request_id:
        return None
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    has_usage = "prompt_tokens" in usage or "completion_tokens" in usage
    if not has_usage:
        source = "none"
    elif usage.get("finished") is True:
        source = "reported"
    else:
        source = "partial"
    return UsageRecord(
        request_id=request_id, occurred_at=occurred_at,
        org_id=authz["org_id"], env_id=authz["env_id"], key_id=authz["key_id"],
        region=authz.get("region", ""), model=authz["model"], endpoint=authz.get("endpoint", ""),
        streamed=bool(authz.get("streamed", False)), status_code=status_code,
        prompt_tokens=prompt, completion_tokens=completion, usage_source=source,
        latency_ms=latency_ms, node=node,
    )


def record_from_entry(entry) -> UsageRecord | None:
    """One gRPC access-log entry (HTTPAccessLogEntry) -> a record."""
    props = entry.common_properties
    latency = props.time_to_last_downstream_tx_byte
    return record_from_fields(
        request_id=entry.request.request_id,
        occurred_at=props.start_time.ToDatetime(tzinfo=UTC) if props.HasField("start_time")
        else datetime.now(UTC),
        authz=_struct(entry, AUTHZ_NAMESPACE), usage=_struct(entry, USAGE_NAMESPACE),
        status_code=entry.response.response_code.value,
        latency_ms=latency.seconds * 1000 + latency.nanos // 1_000_000,
        node=_address(props.upstream_remote_address),
    )
