"""The admin API's routes: one table, from which the router, the access checks and /openapi.json are built.

Each handler translates HTTP into one call of the same data functions the CLI calls (crosslogic/store/...), with
the caller's token as the audit log's actor; there is no second implementation of any action here. Handlers
receive a checked `Call` (the route's parameters and body already validated against its schema, the `{org}`,
`{env}` and `{key_id}` of the path already resolved and scope-checked).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from crosslogic.api.admin import access
from crosslogic.api.admin.access import ANY, KEYS, ORG, PLATFORM, READ, WRITE, Principal
from crosslogic.api.admin.schema import (
    DATETIME,
    INT64,
    NAME,
    UUID,
    Body,
    Param,
    Schema,
    array,
    boolean,
    integer,
    nullable,
    number,
    obj,
    string,
)
from crosslogic.keys import KEY_MODES
from crosslogic.ratelimit import explain
from crosslogic.store import admin_tokens, billing_terms, routing_policy, usage_queries
from crosslogic.store import limit_overrides as lo
from crosslogic.store import tenancy as t
from crosslogic.store.tenancy import to_json


@dataclass
class Call:
    conn: Any  # one pool connection for the whole request
    principal: Principal
    secret: bytes
    default_region: str
    params: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    path: dict[str, str] = field(default_factory=dict)
    org: t.Org | None = None
    env: t.Environment | None = None
    key: t.ApiKeyRecord | None = None

    @property
    def actor(self) -> str:
        return self.principal.actor


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    action: str  # access.READ / KEYS / WRITE
    scope: str  # access.ORG / PLATFORM / ANY
    handler: Handler
    tag: str
    params: tuple[Param, ...] = ()
    body: Body | None = None
    status: int = 200

    @property
    def mutates(self) -> bool:
        return self.method != "GET"


# --------------------------------------------------------------------------------------------- shapes
def _org_json(org: t.Org) -> dict:
    return to_json(org)


def _key_json(key: t.ApiKeyRecord) -> dict:
    return to_json(key)


def _token_json(token: admin_tokens.AdminToken) -> dict:
    return to_json(token)


def _node_json(node: t.Node) -> dict:
    return to_json(node)


def _new_secret(record: dict, field_name: str, plaintext: str) -> dict:
    return {**record, field_name: plaintext,
            "note": "Store it now: it cannot be shown again (only its hash is kept)."}


def _limits_schema(layer: str) -> Schema:
    """A target's settings as a body: a number (or flag, or list of limit kinds) sets it, null clears it."""
    props: dict[str, Schema] = {}
    for setting, column in lo.TARGETS[layer].settings.items():
        if column.flag:
            value = boolean()
        elif column.kinds:
            value = array(string(40, enum=list(lo.RATE_KINDS)), 10)
        else:
            value = integer(column.minimum, INT64 if column.bigint else 2**31 - 1)
        props[setting] = nullable(value)
    return {**obj(props), "minProperties": 1}


# --------------------------------------------------------------------------------------------- handlers
async def me(c: Call) -> dict:
    token = c.principal.token
    return {"token": _token_json(token), "scope": "platform" if token.platform else "org",
            "org": _org_json(await t.get_org(c.conn, token.org_id)) if token.org_id else None,
            "may": sorted(a for a in (READ, KEYS, WRITE) if c.principal.may(a))}


async def list_orgs(c: Call) -> dict:
    if c.principal.platform:
        orgs = await t.list_orgs(c.conn)
    else:
        orgs = [await t.get_org(c.conn, c.principal.token.org_id)]
    return {"object": "list", "data": [_org_json(o) for o in orgs]}


async def create_org(c: Call) -> dict:
    b = c.body
    org = await t.create_org(c.conn, b["name"], b.get("billing_plan", "serverless"), b.get("regions", []),
                             b.get("reserved_tps", 0), actor=c.actor)
    return _org_json(org)


async def get_org(c: Call) -> dict:
    assert c.org is not None
    return _org_json(c.org)


def _org_status(status: str) -> Handler:
    async def handler(c: Call) -> dict:
        assert c.org is not None
        return _org_json(await t.set_org_status(c.conn, c.org.org_id, status, actor=c.actor))

    return handler


async def list_envs(c: Call) -> dict:
    assert c.org is not None
    return {"object": "list", "data": [to_json(e) for e in await t.list_envs(c.conn, c.org.org_id)]}


async def create_env(c: Call) -> dict:
    assert c.org is not None
    b = c.body
    env = await t.create_env(c.conn, c.org.org_id, b["name"], b.get("region"), b.get("models", []),
                             b.get("quota_tokens_per_day"), b.get("concurrency_limit"), actor=c.actor)
    return to_json(env)


def _env_status(status: str) -> Handler:
    async def handler(c: Call) -> dict:
        assert c.env is not None
        return to_json(await t.set_env_status(c.conn, c.env.env_id, status, actor=c.actor))

    return handler


async def list_keys(c: Call) -> dict:
    assert c.org is not None
    env = c.params.get("env")
    keys = await t.list_keys(c.conn, c.org.org_id, env if env is None else
                             (await t.get_env(c.conn, env, c.org.org_id)).env_id)
    return {"object": "list", "data": [_key_json(k) for k in keys]}


async def create_key(c: Call) -> dict:
    assert c.org is not None
    b = c.body
    env = await t.get_env(c.conn, b["env"], c.org.org_id)
    record, plaintext = await t.create_key(
        c.conn, c.secret, c.org.org_id, env.env_id, b.get("name", ""), b.get("region"), b.get("role", "developer"),
        b.get("rate_limit_tokens_per_min"), actor=c.actor, allow_suspended=b.get("allow_suspended", False),
        expires_at=b.get("expires_at"), mode=b.get("mode", "live"))
    return _new_secret(_key_json(record), "api_key", plaintext)


async def get_key(c: Call) -> dict:
    assert c.key is not None
    return _key_json(c.key)


async def rotate_key(c: Call) -> dict:
    assert c.key is not None
    overlap = c.body.get("overlap_seconds", 0)
    record, plaintext = await t.rotate_key(c.conn, c.secret, c.key.key_id, actor=c.actor, overlap_s=overlap)
    old = await t.get_key(c.conn, c.key.key_id)
    return {**_new_secret(_key_json(record), "api_key", plaintext), "replaces": _key_json(old)}


async def revoke_key(c: Call) -> dict:
    assert c.key is not None
    return _key_json(await t.revoke_key(c.conn, c.key.key_id, actor=c.actor))


async def limits_in_force(c: Call) -> dict:
    """What the limiter enforces for the org (or an env, or a key of it) and where each value comes from."""
    assert c.org is not None
    key = env = None
    if c.params.get("key_id"):
        key = await _key_of_org(c, c.params["key_id"])
        env = await t.get_env(c.conn, key.env_id)
    elif c.params.get("env"):
        env = await t.get_env(c.conn, c.params["env"], c.org.org_id)
    ids, view = await explain.limits_in_force(c.conn, c.default_region, c.org, env, key)
    return {"ids": ids, **view.as_json()}


def _set_limits(layer: str) -> Handler:
    async def handler(c: Call) -> dict:
        ident = None
        if layer != "test_keys":  # the one-row table of every test key's caps has no id
            assert c.org is not None
            ident = {"org": c.org.org_id, "env": c.env.env_id if c.env else None,
                     "key": c.key.key_id if c.key else None}[layer]
        ref = await lo.resolve(c.conn, layer, ident)
        setting = {k: v for k, v in c.body.items() if v is not None}
        cleared = [k for k, v in c.body.items() if v is None]
        async with t.transaction(c.conn) as conn:  # both or neither
            if setting:
                await lo.set_limits(conn, ref, setting, actor=c.actor)
            if cleared:
                await lo.clear_limits(conn, ref, cleared, actor=c.actor)
        return {"layer": layer, "id": ref.display_id, "name": ref.label, "set": setting, "cleared": cleared}

    return handler


async def test_key_limits(c: Call) -> dict:
    """The caps every test key gets (a key's own limits can only be lower)."""
    row = await c.conn.fetchrow(lo.TARGETS["test_keys"].select_sql(), True)
    return dict(row) if row else {}


def _usage_query(c: Call, org_id: str | None) -> usage_queries.SeriesQuery:
    p = c.params
    return usage_queries.SeriesQuery(bucket=p.get("bucket", "hour"), since=p.get("since"), until=p.get("until"),
                                     group_by=p.get("group_by"), org_id=org_id, env_id=p.get("env_id"),
                                     key_id=p.get("key_id"), model=p.get("model"), region=p.get("region"),
                                     mode=p.get("mode"))


async def org_usage(c: Call) -> dict:
    assert c.org is not None
    query = _usage_query(c, c.org.org_id)
    return {"object": "usage", "bucket": query.bucket, "group_by": query.group_by,
            "data": await usage_queries.usage_series(c.conn, query)}


async def platform_usage(c: Call) -> dict:
    query = _usage_query(c, c.params.get("org_id"))
    return {"object": "usage", "bucket": query.bucket, "group_by": query.group_by,
            "data": await usage_queries.usage_series(c.conn, query)}


async def billing_status(c: Call) -> dict:
    assert c.org is not None
    return await usage_queries.org_month(c.conn, c.org.org_id)


async def set_billing_terms(c: Call) -> dict:
    assert c.org is not None
    b = c.body
    cap = b.get("bill_cap_usd", "keep")
    terms = await billing_terms.set_org_terms(
        c.conn, c.org.org_id, cap_usd=None if cap in ("keep", None) else cap, clear_cap=cap is None,
        suspend_at_cap=b.get("suspend_at_cap"), free_tokens=b.get("free_tokens_per_month"),
        discount=b.get("discount"), tier=b.get("pricing_tier"), stripe_customer=b.get("stripe_customer_id"),
        cap_fail_closed=b.get("bill_cap_fail_closed"), actor=c.actor)
    return {**to_json(terms), "stripe_customer_id": None if terms.stripe_customer_id is None else "(set)"}


async def list_models(c: Call) -> dict:
    return {"object": "list", "data": [to_json(m) for m in await t.list_models(c.conn)]}


async def put_model(c: Call) -> dict:
    b = c.body
    price = {k: None if b.get(k) is None else t.dollars_to_microdollars(b[k])
             for k in ("input_price_usd_per_1m", "output_price_usd_per_1m")}
    model = await t.add_model(
        c.conn, c.path["model_id"], b.get("kind"), b.get("served_name"), b.get("context_length"),
        b.get("max_output_tokens"), b.get("default_max_tokens"), b.get("vram_gb"), b.get("tokens_per_sec"),
        price["input_price_usd_per_1m"], price["output_price_usd_per_1m"], b.get("max_n"), actor=c.actor)
    return to_json(model)


async def list_regions(c: Call) -> dict:
    return {"object": "list", "data": [to_json(r) for r in await t.list_regions(c.conn)]}


async def put_region(c: Call) -> dict:
    b = c.body
    ppm = None if b.get("price_multiplier") is None else t.multiplier_to_ppm(b["price_multiplier"])
    region = await t.add_region(c.conn, c.path["region_id"], b.get("display_name"), b.get("fallback"), ppm,
                                actor=c.actor)
    return to_json(region)


async def list_prices(c: Call) -> dict:
    return {"object": "list", "data": await billing_terms.list_prices(c.conn, c.params.get("model"))}


async def schedule_price(c: Call) -> dict:
    b = c.body
    version = await billing_terms.schedule_price(c.conn, b["model"], b["input_usd_per_1m"], b["output_usd_per_1m"],
                                                 b.get("effective_from"), actor=c.actor)
    return {"price_version_id": version, "model_id": b["model"]}


async def get_policy(c: Call) -> dict:
    rows, status = await routing_policy.read_policy(c.conn)
    return {"object": "list", "data": rows, "last_check": to_plain(status)}


async def put_policy(c: Call) -> dict:
    return to_plain(await routing_policy.set_policy(c.conn, c.path["region"], c.body, actor=c.actor))


async def delete_policy(c: Call) -> dict:
    await routing_policy.reset_policy(c.conn, c.path["region"], actor=c.actor)
    return {"region": c.path["region"], "deleted": True}


async def list_nodes(c: Call) -> dict:
    return {"object": "list", "data": [_node_json(n) for n in await t.list_nodes(c.conn, c.params.get("region"))]}


def _node_status(status: str, reason: str | None) -> Handler:
    async def handler(c: Call) -> dict:
        node = await t.get_node(c.conn, c.path["node"])
        if reason is None and status == "active" and node.status_reason != t.CORDONED:
            raise t.Conflict(f"node {node.name} is not cordoned")
        return _node_json(await t.set_node_status(c.conn, node.node_id, status, actor=c.actor,
                                                  reason=reason if reason is not None else ""))

    return handler


async def list_tokens(c: Call) -> dict:
    tokens = await admin_tokens.list_tokens(c.conn, c.principal.token.org_id)
    return {"object": "list", "data": [_token_json(x) for x in tokens]}


async def create_token(c: Call) -> dict:
    b = c.body
    org = b.get("org_id")
    if not c.principal.platform:
        if org not in (None, c.principal.token.org_id):
            raise access.not_found("Organization")
        org = c.principal.token.org_id  # an org admin makes tokens of its own org, never platform ones
    record, plaintext = await admin_tokens.create_token(c.conn, c.secret, b["role"], org, b.get("name", ""),
                                                        expires_at=b.get("expires_at"), actor=c.actor)
    return _new_secret(_token_json(record), "token", plaintext)


async def revoke_token(c: Call) -> dict:
    try:
        token = await admin_tokens.get_token(c.conn, c.path["token_id"])
    except t.NotFound:
        raise access.not_found("Admin token") from None
    if not c.principal.platform and token.org_id != c.principal.token.org_id:
        raise access.not_found("Admin token")  # another org's, or a platform token: as if it did not exist
    return _token_json(await admin_tokens.revoke_token(c.conn, token.token_id, actor=c.actor))


SQL_AUDIT = """
SELECT audit_id, at, actor, action, target_type, target_id, details::text AS details FROM audit_log
WHERE ($1::bigint IS NULL OR audit_id < $1) ORDER BY audit_id DESC LIMIT $2
"""


async def audit_log(c: Call) -> dict:
    import json

    rows = await c.conn.fetch(SQL_AUDIT, c.params.get("before"), c.params.get("limit", 100))
    return {"object": "list", "data": [{**to_plain(dict(r)), "details": json.loads(r["details"])} for r in rows]}


def to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


async def _key_of_org(c: Call, key_id: str) -> t.ApiKeyRecord:
    assert c.org is not None
    try:
        key = await t.get_key(c.conn, key_id)
    except t.NotFound:
        raise access.not_found("API key") from None
    if key.org_id != c.org.org_id:
        raise access.not_found("API key")
    return key


# --------------------------------------------------------------------------------------------- the table
P = "/admin/v1"
ORG_P = f"{P}/orgs/{{org}}"
_ENV_REF = string(100, min_length=1)
_USAGE_PARAMS = (
    Param("bucket", string(enum=list(usage_queries.BUCKETS)), description="hour or day (UTC); default hour"),
    Param("since", DATETIME, description="start (inclusive); default 24 buckets before until"),
    Param("until", DATETIME, description="end (exclusive); default now"),
    Param("env_id", UUID), Param("key_id", UUID), Param("model", string(200)), Param("region", string(100)),
    Param("mode", string(enum=list(KEY_MODES)), description="only live or only test keys' usage"),
)
_PLAN = string(enum=list(t.BILLING_PLANS))
_ROLE = string(enum=list(t.KEY_ROLES))
_MONEY = string(40, pattern=r"^[0-9]+(\.[0-9]+)?$")
_POLICY_BODY = {**obj({
    "pinning": string(enum=["strict", "fallback"]), "spill_share": number(0, 1), "retries": integer(0, 10),
    "score_weights": obj({}, free=number(0, 1000)), "queue_capacity": integer(1, 100_000), "load_aware": boolean()}),
    "minProperties": 1}

ROUTES: tuple[Route, ...] = (
    Route("GET", f"{P}/me", "The calling token: role, scope, org", READ, ANY, me, "identity"),
    Route("GET", f"{P}/orgs", "Organizations in scope", READ, ANY, list_orgs, "orgs"),
    Route("POST", f"{P}/orgs", "Create an organization", WRITE, PLATFORM, create_org, "orgs",
          body=Body(obj({"name": NAME, "billing_plan": _PLAN, "regions": array(string(100), 10),
                         "reserved_tps": integer(0)}, ("name",))), status=201),
    Route("GET", ORG_P, "One organization", READ, ORG, get_org, "orgs"),
    Route("POST", f"{ORG_P}/suspend", "Suspend an organization (its keys get 403)", WRITE, PLATFORM,
          _org_status("suspended"), "orgs"),
    Route("POST", f"{ORG_P}/resume", "Resume an organization", WRITE, PLATFORM, _org_status("active"), "orgs"),
    Route("GET", f"{ORG_P}/environments", "Environments of the organization", READ, ORG, list_envs, "environments"),
    Route("POST", f"{ORG_P}/environments", "Create an environment", WRITE, ORG, create_env, "environments",
          body=Body(obj({"name": NAME, "region": string(100), "models": array(string(200)),
                         "quota_tokens_per_day": integer(0), "concurrency_limit": integer(1)}, ("name",))),
          status=201),
    Route("POST", f"{ORG_P}/environments/{{env}}/suspend", "Suspend an environment", WRITE, ORG,
          _env_status("suspended"), "environments"),
    Route("POST", f"{ORG_P}/environments/{{env}}/resume", "Resume an environment", WRITE, ORG,
          _env_status("active"), "environments"),
    Route("GET", f"{ORG_P}/keys", "API keys of the organization (never the keys themselves)", READ, ORG, list_keys,
          "keys", params=(Param("env", _ENV_REF, description="only this environment's (name or id)"),)),
    Route("POST", f"{ORG_P}/keys", "Create an API key (the key is in this answer only)", KEYS, ORG, create_key,
          "keys", body=Body(obj({"env": _ENV_REF, "name": string(100), "region": string(100), "role": _ROLE,
                                 "rate_limit_tokens_per_min": integer(1), "expires_at": DATETIME,
                                 "allow_suspended": boolean(), "mode": string(enum=list(KEY_MODES))},
                                ("env",))), status=201),
    Route("GET", f"{ORG_P}/keys/{{key_id}}", "One API key", READ, ORG, get_key, "keys"),
    Route("POST", f"{ORG_P}/keys/{{key_id}}/rotate", "Replace a key; the old one works for overlap_seconds more",
          KEYS, ORG, rotate_key, "keys",
          body=Body(obj({"overlap_seconds": integer(0, t.MAX_ROTATION_OVERLAP_S)}), required=False), status=201),
    Route("POST", f"{ORG_P}/keys/{{key_id}}/revoke", "Revoke a key (the gateway refuses it within a second)", KEYS,
          ORG, revoke_key, "keys"),
    Route("GET", f"{ORG_P}/limits", "Limits and quotas in force, and where each value comes from", READ, ORG,
          limits_in_force, "limits", params=(Param("env", _ENV_REF), Param("key_id", UUID))),
    Route("PUT", f"{ORG_P}/limits", "Set (number) or clear (null) org limits and quotas", WRITE, PLATFORM,
          _set_limits("org"), "limits", body=Body(_limits_schema("org"))),
    Route("PUT", f"{ORG_P}/environments/{{env}}/limits", "Set or clear an environment's limits", WRITE, ORG,
          _set_limits("env"), "limits", body=Body(_limits_schema("env"))),
    Route("PUT", f"{ORG_P}/keys/{{key_id}}/limits", "Set or clear a key's limits", WRITE, ORG, _set_limits("key"),
          "limits", body=Body(_limits_schema("key"))),
    Route("GET", f"{P}/test-key-limits", "The caps every test key gets (its own limits can only be lower)", READ,
          ANY, test_key_limits, "limits"),
    Route("PUT", f"{P}/test-key-limits", "Set or clear the test-key caps", WRITE, PLATFORM,
          _set_limits("test_keys"), "limits", body=Body(_limits_schema("test_keys"))),
    Route("GET", f"{ORG_P}/usage", "Tokens, requests and cost per hour or day", READ, ORG, org_usage, "usage",
          params=(*_USAGE_PARAMS, Param("group_by", string(enum=["model", "region", "key", "env", "mode"])))),
    Route("GET", f"{P}/usage", "Usage of every org (platform)", READ, PLATFORM, platform_usage, "usage",
          params=(*_USAGE_PARAMS, Param("org_id", UUID),
                  Param("group_by", string(enum=list(usage_queries.GROUPS))))),
    Route("GET", f"{ORG_P}/billing", "The month so far: cost, free tier, reserved capacity, cap, Stripe exports",
          READ, ORG, billing_status, "billing"),
    Route("PUT", f"{ORG_P}/billing", "Billing terms: cap (null = none), free tier, discount, tier, Stripe customer",
          WRITE, PLATFORM, set_billing_terms, "billing",
          body=Body({**obj({"bill_cap_usd": nullable(_MONEY), "suspend_at_cap": boolean(),
                            "free_tokens_per_month": integer(0, INT64), "discount": _MONEY,
                            "pricing_tier": string(100, min_length=1), "stripe_customer_id": string(200, min_length=1),
                            "bill_cap_fail_closed": boolean()}), "minProperties": 1})),
    Route("GET", f"{P}/models", "The model catalogue", READ, ANY, list_models, "catalogue"),
    Route("PUT", f"{P}/models/{{model_id}}", "Add or update a model (fields left out keep their value)", WRITE,
          PLATFORM, put_model, "catalogue",
          body=Body(obj({"kind": string(enum=list(t.MODEL_KINDS)), "served_name": string(200, min_length=1),
                         "context_length": integer(1), "max_output_tokens": integer(1),
                         "default_max_tokens": integer(1), "vram_gb": integer(0), "tokens_per_sec": integer(1),
                         "input_price_usd_per_1m": _MONEY, "output_price_usd_per_1m": _MONEY,
                         "max_n": integer(1, 128)}), required=False)),
    Route("GET", f"{P}/regions", "Regions", READ, ANY, list_regions, "catalogue"),
    Route("PUT", f"{P}/regions/{{region_id}}", "Add or update a region", WRITE, PLATFORM, put_region, "catalogue",
          body=Body(obj({"display_name": string(100, min_length=1), "fallback": array(string(100), 10),
                         "price_multiplier": _MONEY}), required=False)),
    Route("GET", f"{P}/prices", "Price versions per model (micro-dollars per 1M tokens)", READ, ANY, list_prices,
          "catalogue", params=(Param("model", string(200)),)),
    Route("POST", f"{P}/prices", "Schedule a price version (never in the past)", WRITE, PLATFORM, schedule_price,
          "catalogue", body=Body(obj({"model": string(200, min_length=1), "input_usd_per_1m": _MONEY,
                                      "output_usd_per_1m": _MONEY, "effective_from": DATETIME},
                                     ("model", "input_usd_per_1m", "output_usd_per_1m"))), status=201),
    Route("GET", f"{P}/routing-policy", "Routing policy per region and its last validation", READ, PLATFORM,
          get_policy, "routing"),
    Route("PUT", f"{P}/routing-policy/{{region}}", "Set a region's routing policy ('*' = default), validated first",
          WRITE, PLATFORM, put_policy, "routing", body=Body(_POLICY_BODY)),
    Route("DELETE", f"{P}/routing-policy/{{region}}", "Remove a region's policy (the default applies)", WRITE,
          PLATFORM, delete_policy, "routing"),
    Route("GET", f"{P}/nodes", "Inference nodes", READ, PLATFORM, list_nodes, "nodes",
          params=(Param("region", string(100)),)),
    Route("POST", f"{P}/nodes/{{node}}/drain", "Drain: in-flight requests finish, no new ones", WRITE, PLATFORM,
          _node_status("draining", ""), "nodes"),
    Route("POST", f"{P}/nodes/{{node}}/cordon", "Cordon: no new requests until uncordoned (never swept dead)",
          WRITE, PLATFORM, _node_status("draining", t.CORDONED), "nodes"),
    Route("POST", f"{P}/nodes/{{node}}/uncordon", "Put a cordoned node back into service", WRITE, PLATFORM,
          _node_status("active", None), "nodes"),
    Route("GET", f"{P}/tokens", "Admin tokens in scope (never the tokens themselves)", WRITE, ANY, list_tokens,
          "tokens"),
    Route("POST", f"{P}/tokens", "Create an admin token (the token is in this answer only)", WRITE, ANY,
          create_token, "tokens",
          body=Body(obj({"role": _ROLE, "org_id": nullable(UUID), "name": string(100), "expires_at": DATETIME},
                        ("role",))), status=201),
    Route("POST", f"{P}/tokens/{{token_id}}/revoke", "Revoke an admin token", WRITE, ANY, revoke_token, "tokens"),
    Route("GET", f"{P}/audit", "The audit log, newest first (platform)", READ, PLATFORM, audit_log, "audit",
          params=(Param("limit", integer(1, 1000)), Param("before", integer(1, INT64)))),
)

# Path parameters: their schema (for the OpenAPI document and the checks) and what they are.
PATH_PARAMS: dict[str, tuple[Schema, str]] = {
    "org": (string(100, min_length=1), "organization id or name"),
    "env": (string(100, min_length=1), "environment id or name"),
    "key_id": (UUID, "API key id"),
    "model_id": (string(200, min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"), "public model id"),
    "region_id": (string(100, min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$"), "region id"),
    "region": (string(100, min_length=1, pattern=r"^(\*|[a-z0-9][a-z0-9-]*)$"), "region id, or * for the default"),
    "node": (string(100, min_length=1), "node id or name"),
    "token_id": (string(64, min_length=1), "admin token id or prefix"),
}


def utcnow() -> datetime:
    return datetime.now(UTC)
