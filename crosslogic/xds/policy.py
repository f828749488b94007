"""Routing policy (table `routing_policy`): parsed, validated as a whole, and only then used.

A policy that fails validation is never turned into Envoy config: the xDS process keeps building with
the last policy that passed, and records the rejection (with every problem found) in
`routing_policy_status` and its log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from crosslogic.xds.scoring import SCORERS

DEFAULT_SCOPE = "*"
PINNING = ("strict", "fallback")
MAX_RETRIES = 10

SQL_POLICY = """
SELECT region, pinning, spill_share, retries, score_weights, queue_capacity, load_aware FROM routing_policy
"""
SQL_REGIONS = "SELECT region_id, fallback_chain FROM regions WHERE status = 'active'"
SQL_RECORD_STATUS = """
INSERT INTO routing_policy_status (singleton, accepted, message, checked_at) VALUES (true, $1, $2, now())
ON CONFLICT (singleton) DO UPDATE SET accepted = $1, message = $2, checked_at = now()
"""


@dataclass(frozen=True)
class RegionPolicy:
    pinning: str = "fallback"
    spill_share: float = 1.0
    retries: int = 2
    score_weights: Mapping[str, float] = field(
        default_factory=lambda: {"queue": 0.5, "kv_cache": 0.3, "throughput": 0.2})
    queue_capacity: int = 16
    load_aware: bool = True  # False: static weights (the kill switch for the scorers)


@dataclass(frozen=True)
class RoutingPolicy:
    regions: Mapping[str, tuple[str, ...]]  # active region -> fallback chain
    by_region: Mapping[str, RegionPolicy]  # '*' is the default

    def for_region(self, region: str) -> RegionPolicy:
        return self.by_region.get(region) or self.by_region.get(DEFAULT_SCOPE) or RegionPolicy()


class PolicyRejected(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("routing policy rejected: " + "; ".join(problems))
        self.problems = problems


def _weights(value: object) -> dict:
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {"<not an object>": value}


def _check_row(scope: str, row: Mapping, regions: Mapping[str, tuple[str, ...]]) -> list[str]:
    where = f"routing_policy[{scope}]"
    problems = []
    if scope != DEFAULT_SCOPE and scope not in regions:
        problems.append(f"{where}: unknown or disabled region {scope!r}")
    if row["pinning"] not in PINNING:
        problems.append(f"{where}: pinning must be one of {', '.join(PINNING)}, not {row['pinning']!r}")
    if not 0.0 <= row["spill_share"] <= 1.0:
        problems.append(f"{where}: spill_share must be between 0 and 1, not {row['spill_share']}")
    if not 0 <= row["retries"] <= MAX_RETRIES:
        problems.append(f"{where}: retries must be 0..{MAX_RETRIES}, not {row['retries']}")
    if row["queue_capacity"] < 1:
        problems.append(f"{where}: queue_capacity must be at least 1, not {row['queue_capacity']}")
    weights = _weights(row["score_weights"])
    unknown = sorted(set(weights) - set(SCORERS))
    if unknown:
        problems.append(f"{where}: unknown scorers {', '.join(unknown)} (known: {', '.join(SCORERS)})")
    numeric = [w for w in weights.values() if isinstance(w, int | float) and not isinstance(w, bool)]
    if len(numeric) != len(weights) or any(w < 0 for w in numeric):
        problems.append(f"{where}: score weights must be numbers >= 0")
    elif not any(w > 0 for w in numeric):
        problems.append(f"{where}: at least one score weight must be positive")
    return problems


def _check_chains(regions: Mapping[str, tuple[str, ...]]) -> list[str]:
    problems = []
    for region, chain in sorted(regions.items()):
        if region in chain:
            problems.append(f"regions[{region}]: the fallback chain names the region itself")
        for other in chain:
            if other not in regions:
                problems.append(f"regions[{region}]: fallback region {other!r} is unknown or disabled")
        if len(set(chain)) != len(chain):
            problems.append(f"regions[{region}]: the fallback chain repeats a region")
    return problems


def validate(rows: list[Mapping], regions: Mapping[str, tuple[str, ...]]) -> RoutingPolicy:
    """Raises PolicyRejected listing every problem; returns the policy otherwise."""
    problems = _check_chains(regions)
    by_region = {}
    for row in rows:
        found = _check_row(row["region"], row, regions)
        problems += found
        if not found:
            by_region[row["region"]] = RegionPolicy(
                pinning=row["pinning"], spill_share=float(row["spill_share"]), retries=int(row["retries"]),
                score_weights={k: float(v) for k, v in _weights(row["score_weights"]).items()},
                queue_capacity=int(row["queue_capacity"]), load_aware=bool(row.get("load_aware", True)))
    if problems:
        raise PolicyRejected(problems)
    return RoutingPolicy(regions=dict(regions), by_region=by_region)


async def load_policy(conn) -> RoutingPolicy:
    regions = {r["region_id"]: tuple(r["fallback_chain"]) for r in await conn.fetch(SQL_REGIONS)}
    return validate([dict(r) for r in await conn.fetch(SQL_POLICY)], regions)


async def record_status(conn, accepted: bool, message: str) -> None:
    await conn.execute(SQL_RECORD_STATUS, accepted, message)
