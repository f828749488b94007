"""Which limits apply to a key (or an env, or an org), and where each value comes from: `crosslogic limits show`
and the admin API's `GET …/limits` both call `limits_in_force` (one implementation).

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
from crosslogic.ratelimit.quota import QUOTA_COLUMNS, Quotas
from crosslogic.ratelimit.store import TENANT_JOINS, LimitStore
from crosslogic.store import tenancy
from crosslogic.store.limit_overrides import RATE_KINDS, TARGETS, Overrides, Value, read_overrides

# The quotas and per-request caps as ext_authz's tenant view reads them (a test key's caps included).
SQL_KEY_QUOTAS = f"SELECT {QUOTA_COLUMNS} FROM {TENANT_JOINS} WHERE k.key_id = $1"

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
        row = await conn.fetchrow(SQL_KEY_QUOTAS, uuid.UUID(str(key_id)))
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
    key_mode: str | None = None  # the key's mode ("live" / "test") when a key was asked

    def as_json(self) -> dict:
        return {"region": self.region, "plan": self.plan, "reserved_tokens_per_sec": self.reserved_tokens_per_sec,
                **({"key_mode": self.key_mode} if self.key_mode else {}),
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
        if layer == "key":  # a test key's cap wins over the key's own value when lower (never over an equal one)
            found.insert(1, ("test-key cap", ov.test_caps.get(kind)))
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
    def source(level: str, kind: str, value: int | None) -> str:
        if value is None:
            return "not set"
        if ov.test_caps.get(kind) == value and ov.rows.get(level, {}).get(kind) != value:
            return "test-key cap"
        return f"set on the {level}"

    return Explanation(region, ov.plan, tuple(layers), tenant.reserved_tokens_per_sec,
                       tuple((level, Limit(kind, value, source(level, kind, value))) for level, kind, value in quotas),
                       "test" if ov.test_caps else ("live" if "key" in ids else None))


def request_region(default_region: str, org: tenancy.Org, env: tenancy.Environment | None = None,
                   key: tenancy.ApiKeyRecord | None = None) -> str:
    """The region a request of this key (env, org) is served in, as ext_authz picks it."""
    for region in (key.region if key else None, env.region if env else None):
        if region:
            return region
    return org.region_preferences[0] if org.region_preferences else default_region


async def limits_in_force(conn: asyncpg.Connection, default_region: str, org: tenancy.Org,
                          env: tenancy.Environment | None = None,
                          key: tenancy.ApiKeyRecord | None = None) -> tuple[dict[str, str], Explanation]:
    """What the limiter and the quota check enforce for the key (or any key of the env / org), and where each
    value comes from: the one implementation behind `crosslogic limits show` and `GET /admin/v1/orgs/…/limits`.
    Returns the ids of the layers shown and the explanation."""
    ids = {"org": org.org_id}
    if env is not None:
        ids["env"] = env.env_id
    if key is not None:
        ids["key"] = key.key_id
    reading = await read_limits(conn, ids["org"], ids.get("env"), ids.get("key"))
    overrides = await read_overrides(conn, ids["org"], ids.get("env"), ids.get("key"))
    return ids, explain(reading, overrides, request_region(default_region, org, env, key), ids)
