"""Operator edits of rate limits, quotas and layer policy (`crosslogic limits set|clear`), and the raw rows
`limits show` attributes values to. The limiter never reads through here: `ratelimit/store.py` (LimitStore)
is the one place that merges these rows into the limits it enforces.

Each write is an UPDATE of an existing row, so the NOTIFY triggers of migration 002 (statement triggers on
orgs, environments, api_keys, regions, plan_limits, global_limits, rate_limit_layers) tell every running
ext_authz / rate-limit process to drop its cached limits, as for any other edit. The audit_log row is written
in the same transaction as the change.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from crosslogic.contract import LIMIT_KINDS
from crosslogic.store import tenancy
from crosslogic.store.tenancy import Db, InvalidArgument, NotFound

INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1
RATE_KINDS = ("tokens_per_sec", "tokens_per_min", "requests_per_min", "tokens_per_day", "concurrency")
POLICY_LAYERS = ("global", "region", "org", "env", "key")  # rate_limit_layers' rows
SQL_ORG_PLAN = "SELECT billing_plan FROM orgs WHERE org_id = $1"
SQL_LAYER_POLICY = "SELECT layer, fail_open, shadow FROM rate_limit_layers"
SQL_KEY_MODE = "SELECT mode FROM api_keys WHERE key_id = $1"
Value = int | bool | None


@dataclass(frozen=True)
class Column:
    name: str
    bigint: bool = False  # else integer
    minimum: int = 1  # 0 where zero means something (a quota of 0 tokens, no reserved capacity)
    cleared: Value = None  # what `clear` writes: NULL, or the default of a NOT NULL column
    flag: bool = False  # a boolean, not a number
    kinds: bool = False  # a list of limit kinds (text[]), not a number

    def check(self, setting: str, value: Value) -> None:
        if self.kinds:
            if not isinstance(value, list) or not set(value) <= set(LIMIT_KINDS):
                raise InvalidArgument(f"{setting} lists limit kinds ({', '.join(LIMIT_KINDS)}), not {value!r}")
            return
        if self.flag:
            if not isinstance(value, bool):
                raise InvalidArgument(f"{setting} is on or off, not {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{setting} must be a whole number, not {value!r}")
        top = INT8_MAX if self.bigint else INT4_MAX
        if not self.minimum <= value <= top:
            raise InvalidArgument(f"{setting} must be between {self.minimum} and {top:,}, not {value:,}")


def _flag(name: str, cleared: bool) -> Column:
    return Column(name, flag=True, cleared=cleared)


@dataclass(frozen=True)
class Target:
    """One table row operators edit. `settings` maps CLI names to columns: a fixed list, so the generated
    SQL below never holds anything a user typed."""

    layer: str  # org | env | key | global | region | plan | layer
    table: str
    key_column: str
    audit_type: str
    settings: dict[str, Column]

    def select_sql(self, lock: bool = False) -> str:
        columns = ", ".join(f"{c.name} AS {s}" for s, c in self.settings.items())
        return f"SELECT {columns} FROM {self.table} WHERE {self.key_column} = $1" + (" FOR UPDATE" if lock else "")

    def update_sql(self, names: list[str]) -> str:
        assignments = ", ".join(f"{self.settings[n].name} = ${i}" for i, n in enumerate(names, start=2))
        return f"UPDATE {self.table} SET {assignments} WHERE {self.key_column} = $1"


# One rule in shadow mode (migration 005): e.g. a new tokens_per_day limit observes, the others refuse.
_SHADOW_LIMITS = {"shadow_limits": Column("rate_limit_shadow_limits", kinds=True, cleared=[])}
_TENANT_RATES = {"tokens_per_sec": Column("rate_limit_tokens_per_sec"),
                 "tokens_per_min": Column("rate_limit_tokens_per_min"),
                 "requests_per_min": Column("rate_limit_requests_per_min"),
                 "concurrency": Column("concurrency_limit")}
TARGETS: dict[str, Target] = {t.layer: t for t in (
    Target("org", "orgs", "org_id", "org", {
        **_TENANT_RATES, "tokens_per_day": Column("rate_limit_tokens_per_day", bigint=True),
        "reserved_tokens_per_sec": Column("reserved_capacity_tokens_per_sec", minimum=0, cleared=0),
        "quota_tokens_per_day": Column("quota_tokens_per_day", bigint=True, minimum=0),
        "quota_tokens_per_hour": Column("quota_tokens_per_hour", bigint=True, minimum=0),
        "shadow": _flag("rate_limit_shadow", False), **_SHADOW_LIMITS}),
    Target("env", "environments", "env_id", "environment", {
        **_TENANT_RATES,
        "quota_tokens_per_day": Column("quota_tokens_per_day", minimum=0),
        "quota_tokens_per_hour": Column("quota_tokens_per_hour", bigint=True, minimum=0),
        "max_request_bytes": Column("max_request_bytes"),
        "max_tokens_per_request": Column("max_tokens_per_request"),
        "shadow": _flag("rate_limit_shadow", False), **_SHADOW_LIMITS}),
    Target("key", "api_keys", "key_id", "api_key", {**_TENANT_RATES, "shadow": _flag("rate_limit_shadow", False),
                                                    **_SHADOW_LIMITS}),
    Target("global", "global_limits", "singleton", "global_limits", {
        "tokens_per_sec": Column("tokens_per_sec", bigint=True),
        "tokens_per_min": Column("tokens_per_min", bigint=True),
        "requests_per_min": Column("requests_per_min"), "tokens_per_day": Column("tokens_per_day", bigint=True),
        "concurrency": Column("concurrency_limit")}),
    Target("region", "regions", "region_id", "region", {
        "tokens_per_sec": Column("rate_limit_tokens_per_sec", bigint=True),
        "tokens_per_min": Column("rate_limit_tokens_per_min", bigint=True),
        "requests_per_min": Column("rate_limit_requests_per_min"), "concurrency": Column("concurrency_limit")}),
    Target("plan", "plan_limits", "billing_plan", "plan", {
        "tokens_per_min": Column("tokens_per_min"), "requests_per_min": Column("requests_per_min"),
        "tokens_per_day": Column("tokens_per_day", bigint=True), "concurrency": Column("concurrency_limit")}),
    # The caps of every test key (migration 012): a test key's own limits can only be lower.
    Target("test_keys", "test_key_limits", "singleton", "test_key_limits", {
        "tokens_per_min": Column("tokens_per_min"), "requests_per_min": Column("requests_per_min"),
        "concurrency": Column("concurrency_limit"), "max_tokens_per_request": Column("max_tokens_per_request")}),
    # Per layer: fail-open or fail-closed while Redis is unreachable, and shadow mode for the whole layer.
    Target("layer", "rate_limit_layers", "layer", "rate_limit_layer", {
        "fail_open": _flag("fail_open", True), "shadow": _flag("shadow", False)}),
)}
_HINTS = {"shadow": "shadow mode for a whole platform layer: --layer global|region --shadow",
          "tokens_per_day": "tokens per day are limited on the org (and plan) and the global layer",
          "fail_open": "the failure policy is per layer: --layer LAYER --fail-open|--fail-closed"}


@dataclass(frozen=True)
class Ref:
    """A resolved target row: `ident` is what its key column holds, `label` what a human calls it."""

    target: Target
    ident: Any
    label: str

    @property
    def display_id(self) -> str:
        return self.target.layer if self.ident is True else str(self.ident)  # the one-row tables


@dataclass(frozen=True)
class Change:
    layer: str
    ident: str
    label: str
    changes: dict[str, tuple[Value, Value]]  # setting -> (before, after)

    def as_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "id": self.ident, "name": self.label,
                "changes": {k: {"from": a, "to": b} for k, (a, b) in self.changes.items()}}


async def resolve(db: Db, layer: str, ref: str | None = None, *, org: str | None = None,
                  secret: bytes | None = None) -> Ref:
    """The row behind `limits set --<layer> REF` (org/env by name or id, key by id, prefix or plaintext)."""
    target = TARGETS[layer]
    if layer == "org":
        found = await tenancy.get_org(db, ref)
        return Ref(target, uuid.UUID(found.org_id), found.name)
    if layer == "env":
        env = await tenancy.get_env(db, ref, org)
        return Ref(target, uuid.UUID(env.env_id), f"{env.org_name}/{env.name}")
    if layer == "key":
        key = await tenancy.get_key(db, ref, secret=secret)
        return Ref(target, uuid.UUID(key.key_id), key.key_prefix)
    if layer == "global":
        return Ref(target, True, "global")
    if layer == "test_keys":
        return Ref(target, True, "test keys")
    if layer == "region":
        await tenancy.get_region(db, ref)
        return Ref(target, ref, ref)
    allowed = tenancy.BILLING_PLANS if layer == "plan" else POLICY_LAYERS
    if ref not in allowed:
        raise InvalidArgument(f"{layer} must be one of {', '.join(allowed)}, not {ref!r}")
    return Ref(target, ref, ref)


def validate(target: Target, values: dict[str, Value], *, clearing: bool = False) -> None:
    """Refuses, before anything is written, settings this layer does not have and values out of range."""
    if not values:
        raise InvalidArgument("nothing to change: name at least one setting")
    for setting, value in values.items():
        column = target.settings.get(setting)
        if column is None:
            hint = _HINTS.get(setting, "")
            raise InvalidArgument(f"the {target.layer} layer has no {setting} setting (it has: "
                                  f"{', '.join(target.settings)})" + (f"; {hint}" if hint else ""))
        if not clearing:
            column.check(setting, value)


async def _write(db: Db, ref: Ref, values: dict[str, Value], action: str, actor: str) -> Change:
    target = ref.target
    names = list(values)
    async with tenancy.transaction(db) as conn:
        before = await conn.fetchrow(target.select_sql(lock=True), ref.ident)
        if before is None:
            raise NotFound(f"{target.layer} {ref.label!r} not found")
        await conn.execute(target.update_sql(names), ref.ident, *values.values())
        change = Change(target.layer, ref.display_id, ref.label, {n: (before[n], values[n]) for n in names})
        await conn.execute(tenancy.SQL_INSERT_AUDIT, actor, action, target.audit_type, ref.display_id,
                           json.dumps({"name": ref.label, **change.as_json()["changes"]}, default=str))
        return change


@tenancy.db_errors
async def set_limits(db: Db, ref: Ref, values: dict[str, Value], *, actor: str = "system") -> Change:
    validate(ref.target, values)
    return await _write(db, ref, values, "limits.set", actor)


@tenancy.db_errors
async def clear_limits(db: Db, ref: Ref, settings: list[str] | None = None, *, actor: str = "system") -> Change:
    """Back to the default: NULL (inherit / unlimited), 0 reserved capacity, fail-open, no shadow mode.
    `settings` None clears every setting of the row."""
    names = list(ref.target.settings) if settings is None else settings
    validate(ref.target, dict.fromkeys(names), clearing=True)
    return await _write(db, ref, {n: ref.target.settings[n].cleared for n in names}, "limits.clear", actor)


@dataclass(frozen=True)
class Overrides:
    """The raw rows behind one key's (or env's, or org's) limits: what `limits show` attributes values to."""

    plan: str
    rows: dict[str, dict[str, Value]]  # layer (org, env, key, plan) -> setting -> stored value
    policy: dict[str, dict[str, Value]]  # layer -> {"fail_open": ..., "shadow": ...}
    test_caps: dict[str, Value] = field(default_factory=dict)  # a test key's caps (test_key_limits); {} if live


async def read_overrides(db: Db, org_id: str, env_id: str | None = None, key_id: str | None = None) -> Overrides:
    rows: dict[str, dict[str, Value]] = {}
    for layer, ident in (("org", org_id), ("env", env_id), ("key", key_id)):
        if ident is not None:
            row = await db.fetchrow(TARGETS[layer].select_sql(), uuid.UUID(str(ident)))
            rows[layer] = dict(row) if row else {}
    plan = await db.fetchval(SQL_ORG_PLAN, uuid.UUID(str(org_id)))
    plan_row = await db.fetchrow(TARGETS["plan"].select_sql(), plan)
    rows["plan"] = dict(plan_row) if plan_row else {}
    policy_rows = await db.fetch(SQL_LAYER_POLICY)
    test_caps: dict[str, Value] = {}
    if key_id is not None and await db.fetchval(SQL_KEY_MODE, uuid.UUID(str(key_id))) == "test":
        test_caps = dict(await db.fetchrow(TARGETS["test_keys"].select_sql(), True) or {})
    return Overrides(plan, rows, {r["layer"]: {"fail_open": r["fail_open"], "shadow": r["shadow"]}
                                  for r in policy_rows}, test_caps)
