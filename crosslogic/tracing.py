"""OpenTelemetry traces of the control plane's own work (optional: off unless CROSSLOGIC_OTLP_ENDPOINT is set).

Envoy traces every request itself (`envoy.tracers.opentelemetry` in the gateway's connection manager, xds/
resources.py): the ingress span, its ext_authz call and the upstream call to the node, with W3C `traceparent`
sent to ext_authz and to the node. This module adds ext_authz's own span as a child of Envoy's, so one trace
shows Envoy → authz → node; the spans go to the same OTLP/gRPC collector as Envoy's.

Needs the `tracing` extra (opentelemetry-sdk and its OTLP exporter): without it a configured endpoint still
traces in Envoy, and the service says once that its own spans are off. Nothing here runs when tracing is off:
`NO_TRACER` costs one attribute lookup per request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

log = logging.getLogger("crosslogic.tracing")
TRACEPARENT_HEADER = "traceparent"


def trace_id_of(traceparent: str) -> str:
    """The trace id of a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`), or "" for anything else."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1]
    return ""


class Tracer(Protocol):
    def span(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[Any]:
        """A span continuing the trace named by `headers` (traceparent), current while the block runs."""
        ...


class NoTracer:
    enabled = False

    def span(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[Any]:
        return nullcontext()

    def shutdown(self) -> None:
        return None


NO_TRACER = NoTracer()


class OtlpTracer:
    """opentelemetry-sdk with a batching OTLP/gRPC exporter: spans leave off the request path."""

    enabled = True

    def __init__(self, endpoint: str, service_name: str) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=2)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
        self.tracer = self.provider.get_tracer("crosslogic")
        self.propagator = TraceContextTextMapPropagator()

    @contextmanager
    def span(self, name: str, headers: Mapping[str, str]) -> Iterator[Any]:
        parent = self.propagator.extract({TRACEPARENT_HEADER: headers.get(TRACEPARENT_HEADER, "")})
        with self.tracer.start_as_current_span(name, context=parent) as span:
            yield span

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is batched


def tracer_from_settings(endpoint: str, service_name: str) -> NoTracer | OtlpTracer:
    if not endpoint:
        return NO_TRACER
    try:
        return OtlpTracer(endpoint, service_name)
    except ImportError:
        log.warning("CROSSLOGIC_OTLP_ENDPOINT is set but opentelemetry-sdk is not installed "
                    "(pip install 'crosslogic[tracing]'): Envoy traces requests, %s adds no spans", service_name)
        return NO_TRACER
