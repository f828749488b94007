"""Limit values as the limiter sees them (domain values, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crosslogic.contract import LIMIT_KINDS

LAYERS = ("org", "env", "key")  # the org-scoped layers, in the order the scripts see them


@dataclass(frozen=True)
class LayerLimits:
    tokens_per_sec: int | None = None
    tokens_per_min: int | None = None
    requests_per_min: int | None = None
    tokens_per_day: int | None = None
    concurrency: int | None = None
    shadow: bool = False  # every limit of the layer: decide and log, never refuse
    shadow_kinds: frozenset[str] = frozenset()  # only these limits (LIMIT_KINDS) in shadow mode: one rule
    fail_open: bool = True  # when Redis is unreachable

    def set_kinds(self) -> frozenset[str]:
        return frozenset(kind for kind in LIMIT_KINDS if getattr(self, kind) is not None)

    @property
    def limited(self) -> bool:
        return bool(self.set_kinds())

    @property
    def enforced(self) -> bool:
        """Some limit of this layer may refuse (it is set and not in shadow mode)."""
        return not self.shadow and bool(self.set_kinds() - self.shadow_kinds)

    def shadow_mask(self) -> int:
        """The scripts' shadow bitmask: bit k set = LIMIT_KINDS[k] only observes."""
        if self.shadow:
            return (1 << len(LIMIT_KINDS)) - 1
        return sum(1 << i for i, kind in enumerate(LIMIT_KINDS) if kind in self.shadow_kinds)


@dataclass(frozen=True)
class TenantLimits:
    org: LayerLimits
    env: LayerLimits
    key: LayerLimits
    reserved_tokens_per_sec: int = 0  # the org's reserved capacity (seed §17); 0 = serverless only

    def lane(self) -> LayerLimits | None:
        """The reserved lane as a bucket: a minute's worth of the reserved rate."""
        if self.reserved_tokens_per_sec <= 0:
            return None
        return LayerLimits(tokens_per_min=self.reserved_tokens_per_sec * 60)

    def layers(self) -> tuple[LayerLimits, LayerLimits, LayerLimits]:
        return self.org, self.env, self.key

    def fail_open(self) -> bool:
        """Redis is down: admit only if every layer that limits anything (and is enforced) fails open."""
        return all(layer.fail_open for layer in self.layers() if layer.enforced)


UNLIMITED = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits())


@dataclass(frozen=True)
class PlatformLimits:
    """The layers every tenant shares; saturating them sheds serverless traffic first."""

    global_: LayerLimits = LayerLimits()
    regions: dict[str, LayerLimits] = field(default_factory=dict)

    def for_region(self, region: str) -> tuple[LayerLimits, LayerLimits]:
        return self.global_, self.regions.get(region, LayerLimits())

    def limited(self, region: str) -> bool:
        return any(layer.limited for layer in self.for_region(region))

    def fail_open(self, region: str) -> bool:
        return all(layer.fail_open for layer in self.for_region(region) if layer.enforced)
