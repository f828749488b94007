"""One access-log entry -> one usage record. Pure: tested without gRPC or Postgres."""

from __future__ import annotations

from datetime import UTC, datetime

from crosslogic.contract import AUTHZ_NAMESPACE, USAGE_NAMESPACE, AuthzMeta, UsageMeta, metadata_flag
from crosslogic.usage_record import UsageRecord

__all__ = ["AUTHZ_NAMESPACE", "USAGE_NAMESPACE", "UsageRecord", "record_from_entry", "record_from_fields"]


# The only metadata keys a record reads. Picking them from the parsed protobuf, instead of converting whole
# Structs with json_format.MessageToDict, took the entry's decoding from ~40 to ~10 µs (bench/access_log_paths.py,
# docs/architecture.md "The access-log path").
_AUTHZ_KEYS = tuple(m.value for m in (AuthzMeta.ORG_ID, AuthzMeta.ENV_ID, AuthzMeta.KEY_ID, AuthzMeta.MODEL,
                                      AuthzMeta.REGION, AuthzMeta.ENDPOINT, AuthzMeta.STREAMED))
_USAGE_KEYS = tuple(m.value for m in (UsageMeta.PROMPT_TOKENS, UsageMeta.COMPLETION_TOKENS, UsageMeta.FINISHED))


def _scalar(value) -> object:
    """A google.protobuf.Value's Python value (string, number, bool; None for null or a nested value)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value" or kind == "number_value" or kind == "bool_value":
        return getattr(value, kind)
    return None


def _struct(entry, namespace: str, keys: tuple[str, ...]) -> dict:
    metadata = entry.common_properties.metadata.filter_metadata
    if namespace not in metadata:
        return {}
    fields = metadata[namespace].fields
    return {key: _scalar(fields[key]) for key in keys if key in fields}


def _address(address) -> str | None:
    socket = address.socket_address
    return f"{socket.address}:{socket.port_value}" if socket.address else None


def record_from_fields(request_id: str, occurred_at: datetime, authz: dict, usage: dict, status_code: int,
                       latency_ms: int, node: str | None) -> UsageRecord | None:
    """The one place that turns log fields into a record; the gRPC and the file access log both use it.

    `authz` as either ext_authz transport leaves it: typed values over gRPC, strings over HTTP (Envoy's
    dynamic_metadata_from_headers), e.g. `streamed` True or "true"; the same record either way.
    None for requests that never passed authorisation or named no model (nothing to bill).
    """
    if not authz.get(AuthzMeta.MODEL) or not authz.get(AuthzMeta.ORG_ID) or not request_id:
        return None
    prompt = int(usage.get(UsageMeta.PROMPT_TOKENS, 0))
    completion = int(usage.get(UsageMeta.COMPLETION_TOKENS, 0))
    has_usage = UsageMeta.PROMPT_TOKENS in usage or UsageMeta.COMPLETION_TOKENS in usage
    if not has_usage:
        source = "none"
    elif usage.get(UsageMeta.FINISHED) is True:
        source = "reported"
    else:
        source = "partial"
    return UsageRecord(
        request_id=request_id, occurred_at=occurred_at,
        org_id=authz[AuthzMeta.ORG_ID], env_id=authz[AuthzMeta.ENV_ID], key_id=authz[AuthzMeta.KEY_ID],
        region=authz.get(AuthzMeta.REGION, ""), model=authz[AuthzMeta.MODEL],
        endpoint=authz.get(AuthzMeta.ENDPOINT, ""), streamed=metadata_flag(authz.get(AuthzMeta.STREAMED)),
        status_code=status_code,
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
        authz=_struct(entry, AUTHZ_NAMESPACE, _AUTHZ_KEYS), usage=_struct(entry, USAGE_NAMESPACE, _USAGE_KEYS),
        status_code=entry.response.response_code.value,
        latency_ms=latency.seconds * 1000 + latency.nanos // 1_000_000,
        node=_address(props.upstream_remote_address),
    )
