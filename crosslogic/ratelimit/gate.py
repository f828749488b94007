"""The admission decision, free of any protocol: `admission.admit`, the Redis-down policy (fail-open /
fail-closed per layer), shadow logging and the admission metrics.

Used by ext_authz (the default: the reservation is made inside its one decision, DESIGN.md §4, with the limits
of its per-key tenant view: `admit`) and by the Envoy rate-limit service (`service.py`, for deployments that
want Envoy's standard protocol: `decide` reads the limits from a LimitStore first).
"""

from __future__ import annotations

import logging
import time

from crosslogic.ratelimit import metrics
from crosslogic.ratelimit.admission import admit
from crosslogic.ratelimit.connect import REDIS_UNAVAILABLE
from crosslogic.ratelimit.engine import Decision, Limiter
from crosslogic.ratelimit.limits import PlatformLimits, TenantLimits
from crosslogic.ratelimit.store import LimitStore
from crosslogic.runtime.health import dependency
from crosslogic.store.db import POSTGRES_UNAVAILABLE

log = logging.getLogger("crosslogic.ratelimit")


class LimiterUnavailable(Exception):
    """Redis is unreachable and a fail-closed layer applies (or the limits cannot be read): refuse with 503."""


class AdmissionGate:
    def __init__(self, limiter: Limiter, store: LimitStore | None = None) -> None:
        self.limiter = limiter
        self.store = store  # only for `decide`
        self.redis = dependency("redis")  # degraded mode: crosslogic_dependency_down{dependency="redis"}

    async def decide(self, org: str, env: str, key: str, region: str, request_id: str, reserve: int) -> Decision:
        """`admit` with the key's limits read from the store; raises LimiterUnavailable."""
        assert self.store is not None, "decide() needs a LimitStore"
        try:
            limits = await self.store.for_key(key)
            platform = await self.store.platform()
        except POSTGRES_UNAVAILABLE as exc:
            limits, platform = self.store.cached(key), self.store.cached_platform()
            if limits is None or platform is None:
                log.warning("limits unavailable for key %s (%s)", key, exc)
                metrics.record_degraded(False, "limits_unavailable")
                raise LimiterUnavailable from exc
        return await self.admit(org, env, key, region, request_id, reserve, limits, platform)

    async def admit(self, org: str, env: str, key: str, region: str, request_id: str, reserve: int,
                    limits: TenantLimits, platform: PlatformLimits) -> Decision:
        """Reserves `reserve` tokens for `request_id` in every layer, or refuses; raises LimiterUnavailable."""
        started = time.perf_counter()
        try:
            decision = await admit(self.limiter, org, env, key, region, request_id, reserve, limits, platform)
        except REDIS_UNAVAILABLE as exc:
            # Failed calls are timed too: a hanging Redis shows up as the socket timeout in the histogram.
            metrics.limiter_seconds.observe(time.perf_counter() - started)
            self.redis.failed(exc)
            # Logged at most once per CROSSLOGIC_LOG_REPEAT_INTERVAL with a count (crosslogic.logs), not per request.
            if limits.fail_open() and platform.fail_open(region):
                log.warning("redis unavailable (%s): admitting (fail-open)", exc)
                metrics.record_degraded(True, "redis_unavailable")
                return Decision(admitted=True, degraded=True)
            log.warning("redis unavailable (%s): refusing (fail-closed)", exc)
            metrics.record_degraded(False, "redis_unavailable")
            raise LimiterUnavailable from exc
        self.redis.succeeded()
        metrics.record(decision, time.perf_counter() - started)
        if decision.shadow_layer:
            log.info("shadow limit would refuse: org=%s env=%s key=%s layer=%s limit=%s", org, env, key,
                     decision.shadow_layer, decision.shadow_kind)
        return decision
