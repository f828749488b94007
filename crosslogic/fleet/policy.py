"""Fleet policy per (region, model) pool: a row of `fleet_policy` (migration 009), validated before use.

The CLI (`crosslogic fleet policy set`) runs the same validation before writing, and every autoscaler replica runs
it again on every row it reads: a row that does not pass is reported in fleet_policy_status and the pool keeps the
last policy that did (like the routing policy, crosslogic/xds/policy.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ENGINES = ("vllm", "sglang")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ACCELERATORS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(:[1-9][0-9]{0,2})?$")
MAX_NODES_LIMIT = 1000

SQL_POLICIES = "SELECT * FROM fleet_policy ORDER BY region, model"
SQL_RECORD_STATUS = """
INSERT INTO fleet_policy_status (region, model, accepted, message, checked_at) VALUES ($1, $2, $3, $4, now())
ON CONFLICT (region, model) DO UPDATE SET accepted = $3, message = $4, checked_at = now()
"""


class FleetPolicyRejected(ValueError):
    """A fleet policy row that cannot be used; the message says which field and why."""


@dataclass(frozen=True)
class PoolPolicy:
    region: str
    model: str
    min_nodes: int = 1
    max_nodes: int = 4
    reserved_tokens_per_sec: int = 0  # reserved CUs sold in the pool: a floor of nodes
    target_load: float = 0.7
    queue_capacity: int = 4
    scale_up_after_s: float = 30.0
    scale_down_after_s: float = 300.0
    cooldown_s: float = 120.0
    register_deadline_s: float = 900.0
    retry_base_s: float = 30.0
    spot: bool = True
    on_demand_fallback: bool = True
    cloud: str = "aws"
    cloud_region: str = ""
    gpu_type: str = "L4"
    accelerators: str = "L4:1"
    engine: str = "vllm"
    node_tokens_per_sec: int = 0  # 0: the model's catalogue speed

    def floor_nodes(self, node_capacity_tps: float) -> int:
        """The fewest nodes the pool may have: min_nodes, or what its reserved capacity needs."""
        reserved = math.ceil(self.reserved_tokens_per_sec / node_capacity_tps) if node_capacity_tps > 0 else 0
        return max(self.min_nodes, reserved)


POLICY_FIELDS = tuple(f.name for f in fields(PoolPolicy) if f.name not in ("region", "model"))


def _number(row: Mapping[str, Any], name: str, kind: type, low: float, high: float | None = None) -> Any:
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (kind is int and not float(value).is_integer()):
        raise FleetPolicyRejected(f"{name} must be a {'whole ' if kind is int else ''}number, not {value!r}")
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise FleetPolicyRejected(f"{name} must be {bound}, not {value}")
    return kind(value)


def validate(row: Mapping[str, Any], model_tokens_per_sec: float) -> PoolPolicy:
    """A fleet_policy row (or the CLI's candidate) -> PoolPolicy, or FleetPolicyRejected."""
    values: dict[str, Any] = {"region": row["region"], "model": row["model"]}
    values["min_nodes"] = _number(row, "min_nodes", int, 0, MAX_NODES_LIMIT)
    values["max_nodes"] = _number(row, "max_nodes", int, 1, MAX_NODES_LIMIT)
    if values["min_nodes"] > values["max_nodes"]:
        raise FleetPolicyRejected(f"min_nodes ({values['min_nodes']}) is above max_nodes ({values['max_nodes']})")
    values["reserved_tokens_per_sec"] = _number(row, "reserved_tokens_per_sec", int, 0)
    values["target_load"] = _number(row, "target_load", float, 0.05, 1.0)
    values["queue_capacity"] = _number(row, "queue_capacity", int, 1, 100_000)
    for name in ("scale_up_after_s", "scale_down_after_s", "cooldown_s", "retry_base_s"):
        values[name] = _number(row, name, float, 0, 86_400)
    values["register_deadline_s"] = _number(row, "register_deadline_s", float, 1, 86_400)
    values["node_tokens_per_sec"] = _number(row, "node_tokens_per_sec", int, 0)
    for name in ("spot", "on_demand_fallback"):
        if not isinstance(row[name], bool):
            raise FleetPolicyRejected(f"{name} must be true or false, not {row[name]!r}")
        values[name] = row[name]
    for name in ("cloud", "gpu_type"):
        if not isinstance(row[name], str) or not _TOKEN.match(row[name]):
            raise FleetPolicyRejected(f"{name} must be a short name (letters, digits, . _ -), not {row[name]!r}")
        values[name] = row[name]
    if not isinstance(row["cloud_region"], str) or (row["cloud_region"] and not _TOKEN.match(row["cloud_region"])):
        raise FleetPolicyRejected(f"cloud_region must be empty or a region name, not {row['cloud_region']!r}")
    values["cloud_region"] = row["cloud_region"]
    if not isinstance(row["accelerators"], str) or not _ACCELERATORS.match(row["accelerators"]):
        raise FleetPolicyRejected(f"accelerators must look like L4:1 or A100-80GB:8, not {row['accelerators']!r}")
    values["accelerators"] = row["accelerators"]
    if row["engine"] not in ENGINES:
        raise FleetPolicyRejected(f"engine must be one of {', '.join(ENGINES)}, not {row['engine']!r}")
    values["engine"] = row["engine"]
    policy = PoolPolicy(**values)
    capacity = policy.node_tokens_per_sec or model_tokens_per_sec
    if policy.reserved_tokens_per_sec and capacity <= 0:
        raise FleetPolicyRejected("reserved_tokens_per_sec needs a node capacity (node_tokens_per_sec or the "
                                  "model's tokens_per_sec)")
    floor = policy.floor_nodes(capacity)
    if floor > policy.max_nodes:
        raise FleetPolicyRejected(f"the reserved {policy.reserved_tokens_per_sec} tokens/s need {floor} nodes of "
                                  f"{capacity:g} tokens/s, above max_nodes ({policy.max_nodes})")
    return policy


def defaults(region: str, model: str) -> dict[str, Any]:
    """A new pool's row before the operator's changes."""
    base = PoolPolicy(region, model)
    return {"region": region, "model": model, **{name: getattr(base, name) for name in POLICY_FIELDS}}
