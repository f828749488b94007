"""The node agent's own metrics and readiness (`crosslogic agent --metrics-port`): is this node registered, is
its heartbeat getting through, does its engine answer, how long did the model take to load, spot notices.

The engine's own load figures (running, waiting, KV cache, decode rate) are the engine's /metrics, and the
control plane exports what the agents report of them (`crosslogic_node_*` on the xDS process).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

from crosslogic.runtime.readiness import Readiness

registered = Gauge("crosslogic_agent_registered", "1 while this node is registered with the control plane")
engine_up = Gauge("crosslogic_agent_engine_healthy", "1 while the engine answers /health (last probe)")
engine_ready_seconds = Gauge("crosslogic_agent_engine_ready_seconds", "Seconds from the agent's start to the "
                             "engine's first healthy answer (the model's load time when the agent starts it)")
warmup_decode = Gauge("crosslogic_agent_warmup_decode_tokens_per_second", "Decode rate the warm-up benchmark "
                      "measured (the capacity reported at registration)")
reports = Counter("crosslogic_agent_reports", "Heartbeats and metrics reports sent to the control plane",
                  ["kind", "outcome"])
spot_notices = Counter("crosslogic_agent_spot_notices", "Spot / preemption notices received", ["provider"])
for kind in ("heartbeat", "metrics"):
    for outcome in ("ok", "failed"):
        reports.labels(kind, outcome)


class AgentHealth:
    """What the agent's /readyz says: registered, a heartbeat got through lately, the engine answers."""

    def __init__(self, heartbeat_s: float = 5.0) -> None:
        self.heartbeat_s = heartbeat_s
        self.node_id = ""
        self.last_heartbeat: float | None = None  # monotonic time of the last accepted heartbeat

    def registered(self, node_id: str, heartbeat_s: float) -> None:
        self.node_id, self.heartbeat_s, self.last_heartbeat = node_id, heartbeat_s, time.monotonic()
        registered.set(1)

    def heartbeat(self, ok: bool) -> None:
        reports.labels("heartbeat", "ok" if ok else "failed").inc()
        if ok:
            self.last_heartbeat = time.monotonic()

    def left(self) -> None:
        self.node_id = ""
        registered.set(0)

    async def control_plane(self) -> str:
        if not self.node_id or self.last_heartbeat is None:
            raise RuntimeError("not registered with the control plane")
        age = time.monotonic() - self.last_heartbeat
        if age > 3 * self.heartbeat_s:  # the registry calls a node suspect after its heartbeat timeout
            raise RuntimeError(f"no heartbeat accepted for {age:.1f}s")
        return f"registered as {self.node_id}; last heartbeat {age:.1f}s ago"

    def readiness(self, engine) -> Readiness:
        """`engine`: a coroutine function probing the engine's /health now."""

        async def engine_answers() -> str:
            healthy = await engine()
            engine_up.set(1 if healthy else 0)
            if not healthy:
                raise RuntimeError("the engine does not answer /health")
            return "/health 200"

        return Readiness().add("control_plane", self.control_plane).add("engine", engine_answers)
