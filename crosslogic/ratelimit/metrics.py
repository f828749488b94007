"""Admission metrics, recorded by the AdmissionGate and exposed on /metrics by the process that decides
(ext_authz in admission "authz", `serve ratelimit` in admission "rls").

Labels are bounded: layer and kind come from the limiter's fixed vocabulary (anything else is "other"),
never org, env or key ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from crosslogic.ratelimit.engine import KINDS, Decision

LAYERS = frozenset(("org", "env", "key", "lane", "global", "region"))
_KINDS = frozenset(KINDS)

decisions = Counter("crosslogic_ratelimit_decisions", "Admission decisions the limiter made, by outcome and, for "
                    "refusals, the refusing layer and limit kind", ["outcome", "layer", "kind"])
shadow_refusals = Counter("crosslogic_ratelimit_shadow_refusals", "Requests a shadow-mode limit would have refused "
                          "(admitted anyway)", ["layer", "kind"])
degraded = Counter("crosslogic_ratelimit_degraded_decisions", "Decisions made without the limiter: Redis unreachable "
                   "(fail-open admits, fail-closed refuses) or limits unreadable", ["outcome", "reason"])
# Sub-millisecond to a second: one or two EVALSHA round trips normally, the socket timeout when Redis hangs.
limiter_seconds = Histogram("crosslogic_ratelimit_limiter_duration_seconds",
                            "Time of one admission's limiter calls (Redis)",
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
_admitted = decisions.labels("admitted", "", "")  # the hot path: bound once


def _layer(value: str | None) -> str:
    return value if value in LAYERS else "other"


def _kind(value: str | None) -> str:
    return value if value in _KINDS else "other"


def record(decision: Decision, seconds: float) -> None:
    limiter_seconds.observe(seconds)
    if decision.admitted:
        _admitted.inc()
    else:
        decisions.labels("refused", _layer(decision.layer), _kind(decision.kind)).inc()
    if decision.shadow_layer:
        shadow_refusals.labels(_layer(decision.shadow_layer), _kind(decision.shadow_kind)).inc()


def record_degraded(admitted: bool, reason: str) -> None:
    """reason: "redis_unavailable" or "limits_unavailable"."""
    degraded.labels("admitted" if admitted else "refused", reason).inc()
