"""Keeps `crosslogic up`'s children alive: restart with exponential backoff, readiness checked after every
restart, status for runtime.json and Prometheus.

One state machine per child, advanced by `Supervisor.poll()` from the foreground loop (no threads: the
probes are short, and one loop gives one order of events in the log):

    ready ──exit──► backoff ──delay──► starting ──probe ok──► ready
                                          └──exit / not ready in time (killed)──► backoff

The delay doubles with every crash that follows a short run (a crash loop settles at the maximum instead of
restarting every second forever) and drops back to the first delay once a child has been ready for
`healthy_after_s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import prometheus_client

from crosslogic.runtime.backoff import Backoff
from crosslogic.runtime.processes import ChildProcess

log = logging.getLogger("crosslogic.up")

READY, STARTING, BACKOFF = "ready", "starting", "backoff"


@dataclass
class Supervised:
    """One child: how to (re)start it and how to tell that it serves."""

    name: str
    child: Callable[[], ChildProcess | None]  # the current process (a restart may create a new object)
    spawn: Callable[[], None]  # starts a new process, without waiting
    ready: Callable[[], bool]  # short, non-blocking-ish probe: port, HTTP /ready, pg_isready, PING
    state: str = READY  # registered once its first start was ready
    restarts: int = 0
    failures: int = 0  # crashes in a row without a healthy run
    since: float = field(default_factory=time.monotonic)  # when the current state began
    next_start: float = 0.0
    last_exit: int | None = None

    def running(self) -> bool:
        child = self.child()
        return child is not None and child.running


class Supervisor:
    def __init__(self, backoff: Backoff, ready_timeout_s: float, on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.backoff = backoff
        self.ready_timeout_s = ready_timeout_s
        self.on_change = on_change
        self.clock = clock
        self.children: list[Supervised] = []
        self.registry = registry or prometheus_client.CollectorRegistry()
        self._ready = prometheus_client.Gauge("crosslogic_child_ready", "1 while the child serves (its readiness "
                                              "probe passed since its last start)", ["child"], registry=self.registry)
        self._restarts = prometheus_client.Counter("crosslogic_child_restarts", "restarts of a crashed child",
                                                   ["child"], registry=self.registry)
        self._degraded = prometheus_client.Gauge("crosslogic_degraded", "1 while any child of the stack is down "
                                                 "or restarting", registry=self.registry)

    def add(self, child: Supervised) -> None:
        child.since = self.clock()
        self.children.append(child)
        self._ready.labels(child.name).set(1)
        self._restarts.labels(child.name)

    @property
    def degraded(self) -> bool:
        return any(c.state != READY for c in self.children)

    def poll(self) -> None:
        changed = False
        for child in self.children:
            changed |= self._advance(child, self.clock())
        if changed:
            self._degraded.set(1 if self.degraded else 0)
            self.on_change()

    def _advance(self, c: Supervised, now: float) -> bool:
        if c.state == READY:
            if c.failures and now - c.since >= self.backoff.healthy_after_s:
                c.failures = 0  # a healthy run: the next crash restarts after the first delay again
            if not c.running():
                self._crashed(c, now, f"exited with code {self._exit_code(c)} after {now - c.since:.1f}s ready")
                return True
            return False
        if c.state == STARTING:
            if not c.running():
                self._crashed(c, now, f"exited with code {self._exit_code(c)} before it was ready")
                return True
            if c.ready():
                log.info("%s is ready again (restart %d)", c.name, c.restarts)
                self._set(c, READY, now)
                self._ready.labels(c.name).set(1)
                return True
            if now - c.since > self.ready_timeout_s:
                child = c.child()
                if child is not None:
                    child.kill()
                self._crashed(c, now, f"not ready {self.ready_timeout_s:.0f}s after its start; killed")
                return True
            return False
        if c.state == BACKOFF and now >= c.next_start:
            c.restarts += 1
            self._restarts.labels(c.name).inc()
            try:
                c.spawn()
            except OSError as exc:
                self._crashed(c, now, f"could not be started ({exc})")
                return True
            self._set(c, STARTING, now)
            return True
        return False

    @staticmethod
    def _exit_code(c: Supervised) -> int | None:
        child = c.child()
        return child.returncode if child is not None else None

    def _crashed(self, c: Supervised, now: float, why: str) -> None:
        child = c.child()
        if child is not None:
            child.kill_leftovers()  # e.g. a killed postmaster's backends, before a new one starts
        c.last_exit = self._exit_code(c)
        c.failures += 1
        delay = self.backoff.delay(c.failures)
        c.next_start = now + delay
        self._set(c, BACKOFF, now)
        self._ready.labels(c.name).set(0)
        log.warning("%s %s; restarting in %.1fs (crash %d in a row)", c.name, why, delay, c.failures)

    @staticmethod
    def _set(c: Supervised, state: str, now: float) -> None:
        c.state, c.since = state, now

    def status(self) -> dict:
        """For runtime.json: what an operator (or a test) needs to see the stack's health without a scrape."""
        now = self.clock()
        children = {}
        for c in self.children:
            child = c.child()
            entry = {"state": c.state, "pid": child.pid if child is not None and c.running() else None,
                     "restarts": c.restarts, "crashes_in_a_row": c.failures, "last_exit": c.last_exit,
                     "for_s": round(now - c.since, 1)}
            if c.state == BACKOFF:
                entry["restart_in_s"] = round(max(0.0, c.next_start - now), 1)
            children[c.name] = entry
        return {"degraded": self.degraded, "children": children}
