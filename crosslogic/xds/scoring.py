"""Node headroom -> EDS load_balancing_weight: small scorers (each 0..1), combined with policy weights.

llm-d style: every signal is its own scorer returning 0 (no headroom) .. 1 (idle); the routing policy
weighs them (`routing_policy.score_weights`). The combined headroom is scaled by the node's capacity
relative to its model's catalogue speed, so a node twice as fast gets twice the share when both are idle:

    headroom = sum(w_i * score_i) / sum(w_i)                                   in [0, 1]
    weight   = max(1, round(BASE * quantise(headroom) * clamp(capacity / reference, 0.1, 10)))

Why: Envoy's LEAST_REQUEST already balances the requests *this* Envoy has in flight; the weights add what
it cannot see — load from every other Envoy and from long generations (the node's own queue, KV-cache
pressure and decode rate). Headroom is quantised to 5 % steps so that noise in the metrics does not cause
a push every scrape. The floor of 1 keeps a busy node reachable: health, not weight, removes a node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

BASE_WEIGHT = 100
MAX_CAPACITY_RATIO = 10.0
MIN_CAPACITY_RATIO = 0.1
QUANTUM = 0.05


@dataclass(frozen=True)
class NodeLoad:
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    tokens_per_sec: float = 0.0  # measured decode rate
    capacity_tokens_per_sec: float = 0.0  # the node's expected rate; 0 = unknown


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def queue_score(load: NodeLoad, queue_capacity: int) -> float:
    """1 with nothing waiting, 0 once `queue_capacity` requests wait."""
    return 1.0 - _clamp(load.requests_waiting / max(1, queue_capacity), 0.0, 1.0)


def kv_cache_score(load: NodeLoad, _queue_capacity: int) -> float:
    return 1.0 - _clamp(load.kv_cache_usage, 0.0, 1.0)


def throughput_score(load: NodeLoad, _queue_capacity: int) -> float:
    """Share of the node's decode capacity still free (1 when the capacity is unknown)."""
    if load.capacity_tokens_per_sec <= 0:
        return 1.0
    return 1.0 - _clamp(load.tokens_per_sec / load.capacity_tokens_per_sec, 0.0, 1.0)


SCORERS: dict[str, Callable[[NodeLoad, int], float]] = {
    "queue": queue_score,
    "kv_cache": kv_cache_score,
    "throughput": throughput_score,
}


def headroom(load: NodeLoad, weights: Mapping[str, float], queue_capacity: int) -> float:
    total = sum(w for name, w in weights.items() if name in SCORERS and w > 0)
    if total <= 0:
        return 1.0
    score = sum(w * SCORERS[name](load, queue_capacity) for name, w in weights.items() if name in SCORERS and w > 0)
    return _clamp(score / total, 0.0, 1.0)


def eds_weight(load: NodeLoad, weights: Mapping[str, float], queue_capacity: int,
               reference_tokens_per_sec: float) -> int:
    quantised = round(headroom(load, weights, queue_capacity) / QUANTUM) * QUANTUM
    capacity = load.capacity_tokens_per_sec or reference_tokens_per_sec
    ratio = 1.0 if reference_tokens_per_sec <= 0 or capacity <= 0 else capacity / reference_tokens_per_sec
    return max(1, round(BASE_WEIGHT * quantised * _clamp(ratio, MIN_CAPACITY_RATIO, MAX_CAPACITY_RATIO)))
