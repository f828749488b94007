"""Which limits apply to a key (or an env, or an org), and where each value comes from: `crosslogic limits show`.

The numbers are LimitStore's own reading -- the one merge of plan defaults, overrides and layer policy that
the limiter enforces -- and the quota reader's, never a second copy of them; the raw rows (store/
limit_overrides.py) only say which of them a value came from. LimitStore reads per key: for an env or org
shown without a key, a probe env and key are inserted in a transaction that is always rolled back (nothing
commits, so nothing is notified or audited). The org and env layers are the same for every key of an env.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

import asyncpg

from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits
from crosslogic.ratelimit.quota import QUOTAS_SQL, Quotas
from crosslogic.ratelimit.store import LimitStore
from crosslogic.store.limit_overrides import RATE_KINDS, TARGETS, Overrides, Value

SQL_PROBE_ENV = """
INSERT INTO environments (org_id, name) VALUES ($1, 'limits-probe-' || gen_random_uuid()) RETURNING env_id"""
SQL_PROBE_KEY = """
INSERT INTO api_keys (key_hash, key_prefix, org_id, env_id, name)
VALUES ('limits-probe-' || gen_random_uuid(), 'probe', $1, $2, 'limits probe') RETURNING key_id"""
# A value is attributed to the most specific row holding it: the key layer's own override, then (should the
# merge ever inherit) the env's and the org's, then the plan default.
_CHAIN = {"org": ("org",), "env": ("env", "org"), "key": ("key", "env", "org")}


@dataclass(frozen=True)
class Reading:
    tenant: TenantLimits
    platform: PlatformLimits
    quotas: Quotas


async def read_limits(conn: asyncpg.Connection, org_id: str, env_id: str | None = None,
                      key_id: str | None = None) -> Reading:
    """What the limiter and the quota check enforce for this key (or for any key of the env / org)."""
    probe = conn.transaction()
    await probe.start()
    try:
        if env_id is None:
            env_id = await conn.fetchval(SQL_PROBE_ENV, uuid.UUID(org_id))
        if key_id is None:
            key_id = await conn.fetchval(SQL_PROBE_KEY, uuid.UUID(org_id), env_id)
        store = LimitStore(conn)  # a connection answers fetch/fetchrow as the pool does
        tenant = await store.for_key(str(key_id))
        platform = await store.platform()
        row = await conn.fetchrow(QUOTAS_SQL, uuid.UUID(str(env_id)))
    finally:
        await probe.rollback()
    return Reading(tenant, platform, Quotas(**dict(row)) if row else Quotas())


@dataclass(frozen=True)
class Limit:
    kind: str
    value: int | None
    source: str


@dataclass(frozen=True)
class LayerView:
    layer: str
    ident: str
    limits: tuple[Limit, ...]
    shadow: bool
    shadow_source: str
    fail_open: bool
    shadow_limits: tuple[str, ...] = ()  # single rules in shadow mode (the layer's other limits refuse)


@dataclass(frozen=True)
class Explanation:
    region: str
    plan: str
    layers: tuple[LayerView, ...]
    reserved_tokens_per_sec: int
    quotas: tuple[tuple[str, Limit], ...]  # (level, limit)

    def as_json(self) -> dict:
        return {"region": self.region, "plan": self.plan, "reserved_tokens_per_sec": self.reserved_tokens_per_sec,
                "layers": [asdict(v) for v in self.layers],
                "quotas": [{"level": level, **asdict(q)} for level, q in self.quotas]}


def attribute(value: Value, candidates: list[tuple[str, Value]]) -> str:
    """The first candidate (name, stored value) holding `value`; "unlimited" for None."""
    if value is None:
        return "unlimited"
    for name, stored in candidates:
        if stored is not None and stored == value:
            return name
    return "unattributed"  # the merge took it from a row this view does not know: shown, never guessed


def _kinds(layer: str, limits: LayerLimits) -> list[str]:
    """The kinds the layer can have (its settable columns), plus any the limiter reports a value for."""
    settable = TARGETS[layer].settings.keys() | (TARGETS["plan"].settings.keys() if layer == "org" else set())
    return [k for k in RATE_KINDS if k in settable or getattr(limits, k) is not None]


def _tenant_view(layer: str, ident: str, limits: LayerLimits, ov: Overrides) -> LayerView:
    def candidates(kind: str) -> list[tuple[str, Value]]:
        found = [(f"{level} override", ov.rows.get(level, {}).get(kind)) for level in _CHAIN[layer]]
        return found + [(f"plan default ({ov.plan})", ov.rows["plan"].get(kind))]

    shadow_sources = [name for name, on in (("layer policy", ov.policy.get(layer, {}).get("shadow")),
                                            (f"{layer} flag", ov.rows.get(layer, {}).get("shadow"))) if on]
    values = tuple(Limit(k, getattr(limits, k), attribute(getattr(limits, k), candidates(k)))
                   for k in _kinds(layer, limits))
    shadow_source = ", ".join(shadow_sources) or ("unattributed" if limits.shadow else "-")
    return LayerView(layer, ident, values, limits.shadow, shadow_source, limits.fail_open,
                     tuple(k for k in RATE_KINDS if k in limits.shadow_kinds))


def _platform_view(layer: str, ident: str, limits: LayerLimits, ov: Overrides) -> LayerView:
    source = "global_limits" if layer == "global" else f"regions ({ident})"
    policy = ov.policy.get(layer, {})
    # An unlimited platform layer is skipped by the limiter; show the policy it would get once limited.
    shadow = limits.shadow if limits.limited else bool(policy.get("shadow"))
    fail_open = limits.fail_open if limits.limited else bool(policy.get("fail_open", True))
    values = tuple(Limit(k, getattr(limits, k), "unlimited" if getattr(limits, k) is None else source)
                   for k in _kinds(layer, limits))
    return LayerView(layer, ident, values, shadow, "layer policy" if shadow else "-", fail_open)


def explain(reading: Reading, ov: Overrides, region: str, ids: dict[str, str]) -> Explanation:
    """`ids` names the tenant layers to show: {"org": id} plus "env" and "key" where a key or env was asked."""
    tenant = reading.tenant
    layers = [_tenant_view(layer, ids[layer], getattr(tenant, layer), ov) for layer in ("org", "env", "key")
              if layer in ids]
    lane = tenant.lane()
    if lane is not None:
        source = f"reserved capacity ({tenant.reserved_tokens_per_sec} tokens/s x 60)"
        layers.append(LayerView("lane", ids["org"], tuple(Limit(k, getattr(lane, k), source)
                                                          for k in RATE_KINDS if getattr(lane, k) is not None),
                                False, "-", lane.fail_open))
    global_, regional = reading.platform.for_region(region)
    layers += [_platform_view("global", "all", global_, ov), _platform_view("region", region, regional, ov)]
    q = reading.quotas
    quotas = [("org", "quota_tokens_per_day", q.org_day), ("org", "quota_tokens_per_hour", q.org_hour)]
    if "env" in ids:
        quotas += [("env", "quota_tokens_per_day", q.env_day), ("env", "quota_tokens_per_hour", q.env_hour),
                   ("env", "max_request_bytes", q.max_request_bytes),
                   ("env", "max_tokens_per_request", q.max_tokens_per_request)]
    return Explanation(region, ov.plan, tuple(layers), tenant.reserved_tokens_per_sec,
                       tuple((level, Limit(kind, value, "not set" if value is None else f"set on the {level}"))
                             for level, kind, value in quotas))
