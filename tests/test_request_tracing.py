"""One request followed through the stack (docs/observability.md): by its request id in the JSON logs of Envoy,
ext_authz and the accounting service and in the ledger; and as one OpenTelemetry trace Envoy → ext_authz → node,
received by a real OTLP/gRPC trace receiver (opentelemetry-proto's TraceService, served by this test)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from crosslogic.runtime.processes import free_port
from tests.conftest import up_demo
from tests.gateway_helpers import client, ledger_row
from tests.ratelimit_helpers import wait_for

MESSAGES = [{"role": "user", "content": "Trace me"}]


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC collector that keeps every span it is sent: (service.name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (gRPC name)
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[tuple[str, object]]:
        with self.lock:
            return [(service, span) for service, span in self.spans if span.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The demo stack with tracing to the receiver, JSON logs at DEBUG (a line per request in authz and
    accounting), ext_authz over HTTP (the default transport)."""
    receiver = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    env = {**os.environ, "CROSSLOGIC_OTLP_ENDPOINT": f"127.0.0.1:{port}", "CROSSLOGIC_LOG_FORMAT": "json",
           "CROSSLOGIC_LOG_LEVEL": "DEBUG", "CROSSLOGIC_AUTHZ_TRANSPORT": "http"}
    try:
        with up_demo(tmp_path_factory.mktemp("traced"), env=env) as info:
            yield {**info, "receiver": receiver}
    finally:
        server.stop(0)


def _json_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def _request(stack: dict) -> str:
    raw = await client(stack).chat.completions.with_raw_response.create(model="llama-3-8b", messages=MESSAGES,
                                                                         max_tokens=5)
    return raw.headers["x-request-id"]


async def test_one_request_id_finds_the_request_in_envoys_authzs_and_accountings_logs_and_the_ledger(traced):
    request_id = await _request(traced)
    row = await ledger_row(traced["database_url"], request_id)
    logs = Path(traced["state_dir"]) / "logs"

    async def logged() -> dict | None:
        found = {name: [e for e in _json_lines(logs / f"{name}.log") if e.get("request_id") == request_id]
                 for name in ("authz", "accounting")}
        return found if all(found.values()) else None

    found = await wait_for(logged, "the request's lines in ext_authz's and accounting's logs")
    authz, accounting = found["authz"][0], found["accounting"][0]
    assert authz["service"] == "authz" and "allowed to ap-south/llama-3-8b" in authz["message"]
    assert accounting["service"] == "accounting"
    assert f"{row['prompt_tokens']}+{row['completion_tokens']} tokens" in accounting["message"]
    assert {"time", "level", "logger", "message"} <= set(authz)
    envoy_usage = [json.loads(line) for line in
                   (Path(traced["state_dir"]) / "usage" / "envoy-usage.jsonl").read_text().splitlines()]
    assert [e["request_id"] for e in envoy_usage].count(request_id) == 1  # Envoy's own access log
    # Every line of every service is JSON (a text line would break a log pipeline that parses them).
    for name in ("authz", "accounting", "api", "xds", "fleet"):
        text = (logs / f"{name}.log").read_text().strip().splitlines()
        assert text and all(line.startswith("{") and json.loads(line) for line in text), name


async def test_one_trace_spans_envoy_ext_authz_and_the_call_to_the_node(traced):
    request_id = await _request(traced)
    logs = Path(traced["state_dir"]) / "logs"

    async def trace_id() -> str | None:
        return next((e["trace_id"] for e in _json_lines(logs / "authz.log")
                     if e.get("request_id") == request_id and e.get("trace_id")), None)

    trace = await wait_for(trace_id, "ext_authz's log line with the trace id")
    receiver: TraceReceiver = traced["receiver"]

    def complete() -> list | None:  # Envoy sends spans as they end, in batches: the request's own span last
        spans = receiver.trace(trace)
        services = {service for service, _ in spans}
        root = [s for service, s in spans if service == "crosslogic-gateway" and not s.parent_span_id]
        return spans if {"crosslogic-gateway", "crosslogic-authz"} <= services and root else None

    async def received() -> list | None:
        return complete()

    spans = await wait_for(received, "Envoy's and ext_authz's spans at the OTLP receiver", timeout_s=30)
    by_id = {span.span_id: (service, span) for service, span in spans}
    envoy = [span for service, span in spans if service == "crosslogic-gateway"]
    authz = [span for service, span in spans if service == "crosslogic-authz"]
    roots = [span for span in envoy if not span.parent_span_id]
    assert len(roots) == 1, [s.name for s in envoy]
    tags = {a.key: a.value.string_value for a in roots[0].attributes}
    assert tags["crosslogic.request_id"] == request_id
    # ext_authz's span is a child of Envoy's span for the ext_authz call, which is a child of the request's
    (check,) = authz
    parent_service, parent = by_id[check.parent_span_id]
    assert parent_service == "crosslogic-gateway" and parent.trace_id == roots[0].trace_id
    assert {a.key: a.value.string_value for a in check.attributes}["crosslogic.request_id"] == request_id
    # ... and the call to the node is an upstream span of the same trace, naming the pool it went to.
    upstream = [span for span in envoy if span is not roots[0] and any(
        a.key == "upstream_cluster" and a.value.string_value == "ap-south/llama-3-8b" for a in span.attributes)]
    assert upstream, [(s.name, [a.key for a in s.attributes]) for s in envoy]
    assert time.time_ns() >= roots[0].end_time_unix_nano >= roots[0].start_time_unix_nano
