"""The narrow interface between the autoscaler and whatever gives it machines: launch, terminate, list, price.

Two implementations: crosslogic/fleet/skypilot.py (any cloud, through SkyPilot's Python SDK) and
crosslogic/fleet/local.py (simulated nodes with real agents as local processes: tests, the demo, the bench).
A machine is named after the node it becomes, so every call is idempotent by name: a replica that died between
asking for a machine and recording its handle leaves nothing another replica cannot find and give back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class NodeSpec:
    """One node to launch: where, on what, serving what."""

    name: str
    region: str  # the CrossLogic region it registers in
    model: str
    cloud: str
    gpu_type: str
    accelerators: str  # SkyPilot's form, e.g. "L4:1"
    spot: bool
    engine: str = "vllm"  # vllm or sglang
    cloud_region: str = ""  # the cloud's region name; "" = the provider picks
    model_version: str = ""


@dataclass(frozen=True)
class Machine:
    name: str
    machine_id: str  # the provider's handle
    state: str  # "launching", "up", "gone"
    spot: bool
    price_microdollars_per_hour: int | None = None  # what the provider says it costs, if it knows


class LaunchFailed(Exception):
    """The provider could not start the machine (retried with backoff)."""


class CapacityUnavailable(LaunchFailed):
    """No capacity of that kind right now (spot: fall back to on-demand where the policy allows)."""


class Provider(Protocol):
    name: str

    async def launch(self, spec: NodeSpec) -> Machine:
        """Starts the machine; returns once the provider has it (its agent registers by itself later)."""

    async def terminate(self, name: str) -> None:
        """Gives the machine back; a machine that is already gone is not an error."""

    async def list(self) -> list[Machine]:
        """Every machine this provider holds for us."""

    def price(self, spec: NodeSpec) -> int | None:
        """Micro-dollars per hour for this spec (spot or on-demand), None when the provider cannot say."""
