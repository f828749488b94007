"""Degraded mode of one service process: which dependency it is running without, as a metric and a log line.

The per-request warnings of a dependency outage are throttled by crosslogic.logs; this adds the state an
operator alerts on (`crosslogic_dependency_down{dependency}` = 1 while the process decides without it) and a
line when the outage ends, with how long it lasted and how many calls failed.
"""

from __future__ import annotations

import logging
import time

import prometheus_client

log = logging.getLogger("crosslogic.health")

DEPENDENCY_DOWN = prometheus_client.Gauge(
    "crosslogic_dependency_down", "1 while this process's calls to the dependency fail (degraded mode)",
    ["dependency"])


class Dependency:
    def __init__(self, name: str) -> None:
        self.name = name
        self.down_since: float | None = None
        self.failed_calls = 0
        DEPENDENCY_DOWN.labels(name).set(0)

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            DEPENDENCY_DOWN.labels(self.name).set(1)
            log.warning("%s unavailable (%s): running degraded until it is back", self.name, exc)
        self.failed_calls += 1

    def succeeded(self) -> None:
        """Cheap on the hot path: only the first success after an outage does anything."""
        if self.down_since is None:
            return
        log.warning("%s is back after %.1fs (%d calls failed meanwhile)", self.name,
                    time.monotonic() - self.down_since, self.failed_calls)
        self.down_since, self.failed_calls = None, 0
        DEPENDENCY_DOWN.labels(self.name).set(0)


_dependencies: dict[str, Dependency] = {}


def dependency(name: str) -> Dependency:
    """The process-wide tracker of `name` ("redis", "postgres"): every caller sees the same state."""
    found = _dependencies.get(name)
    if found is None:
        found = _dependencies[name] = Dependency(name)
    return found
