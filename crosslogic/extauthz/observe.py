"""Every ext_authz check, observed: its log lines carry the request id, and it is counted and timed.

The outermost checker (around the failure budget, throttle.py), for either transport. Labels are bounded:
status and OpenAI error code come from errors.py's fixed vocabulary; region and model from the decision's
metadata, which names only catalogue models (an unknown model is refused with model_not_found before it gets
there), never org, env or key ids.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram

from crosslogic.contract import REQUEST_ID_HEADER, AuthzMeta
from crosslogic.extauthz.check import Checker, Denied, Verdict
from crosslogic.logs import request_context
from crosslogic.tracing import NO_TRACER, TRACEPARENT_HEADER, Tracer, trace_id_of

log = logging.getLogger("crosslogic.extauthz")

checks = Counter("crosslogic_authz_checks", "ext_authz checks by answer: allowed, or the refusal's status and "
                 "OpenAI error code", ["outcome", "status", "code"])
routed = Counter("crosslogic_authz_allowed_requests", "Requests ext_authz allowed, by the pool they go to",
                 ["region", "model"])
# Tens of microseconds (a cached key) to the 2 s Envoy gives the check: Postgres reads on a cache miss, Valkey.
check_seconds = Histogram("crosslogic_authz_check_duration_seconds", "Time of one ext_authz check, "
                          "inside the service", buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                                                          0.1, 0.25, 0.5, 1.0, 2.0))
_allowed = checks.labels("allowed", "200", "")


class ObservedChecker:
    def __init__(self, inner: Checker, tracer: Tracer = NO_TRACER) -> None:
        self.inner = inner
        self.tracer = tracer
        self._routed: dict[tuple[str, str], object] = {}  # bound children: labels() takes a lock per call

    async def check(self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes) -> Verdict:
        request_id = headers.get(REQUEST_ID_HEADER, "")
        traceparent = headers.get(TRACEPARENT_HEADER)
        with request_context(request_id, trace_id_of(traceparent) if traceparent else ""), \
                self.tracer.span("ext_authz check", headers) as span:
            started = time.perf_counter()
            verdict = await self.inner.check(peer, method, path, headers, body)
            check_seconds.observe(time.perf_counter() - started)
            if isinstance(verdict, Denied):
                error = verdict.error
                checks.labels("refused", str(error.status), error.code or "").inc()
                log.debug("%s %s refused: %d %s", method, path, error.status, error.code)
                outcome = {"crosslogic.outcome": "refused", "http.response.status_code": error.status,
                           "crosslogic.error_code": error.code or ""} if span is not None else None
            else:
                _allowed.inc()
                region, model = verdict.metadata.get(AuthzMeta.REGION), verdict.metadata.get(AuthzMeta.MODEL)
                if region and model:
                    self._pool_counter(str(region), str(model)).inc()
                log.debug("%s %s allowed to %s/%s", method, path, region, model)
                outcome = {"crosslogic.outcome": "allowed", "http.response.status_code": 200,
                           "crosslogic.region": str(region or ""), "crosslogic.model": str(model or "")} \
                    if span is not None else None
            if outcome is not None:  # no tenant ids on spans either: they leave for a third-party collector
                span.set_attributes({"http.request.method": method, "url.path": path[:200],
                                     "crosslogic.request_id": request_id, **outcome})
            return verdict

    def _pool_counter(self, region: str, model: str):
        counter = self._routed.get((region, model))
        if counter is None:  # bounded: catalogue models in known regions (the decision refused the rest)
            counter = self._routed[(region, model)] = routed.labels(region, model)
        return counter
