"""Exponential restart backoff, shared by `crosslogic up` (its children) and the node agent (its engine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    maximum_s: float = 60.0
    factor: float = 2.0
    # A run at least this long counts as healthy and resets the backoff.
    healthy_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Wait before restart number `failures` of a crash loop (1 = the first crash after a healthy run)."""
        return min(self.maximum_s, self.initial_s * self.factor ** max(0, failures - 1))
