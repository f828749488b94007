"""Operator admin commands: tenancy and catalogue, straight against Postgres.

    crosslogic org create NAME [--plan free|serverless|reserved|enterprise] [--region R]... [--reserved-tps N]
    crosslogic org list | org suspend ORG | org resume ORG
    crosslogic env create NAME --org ORG [--region R] [--models M,M] [--quota-tokens-per-day N]
                                         [--concurrency-limit N]
    crosslogic env list [--org ORG] | env suspend ENV [--org ORG] | env resume ENV [--org ORG]
    crosslogic key create --org ORG --env ENV [--name N] [--region R] [--role admin|developer|read-only]
                                              [--rate-limit-tokens-per-min N] [--allow-suspended]
                                              [--expires-at TIME] [--test]
    crosslogic key list [--org ORG] [--env ENV] | key revoke KEY | key rotate KEY [--overlap SECONDS]
    crosslogic token create --role admin|developer|read-only [--org ORG] [--name N] [--expires-at TIME]
    crosslogic usage show [--org ORG] [--bucket hour|day] [--group-by model|region|key|env|mode|org] [--mode live|test]
                          [--since T] [--until T]
    crosslogic usage month --org ORG                                 (the admin API's usage and billing queries)
    crosslogic token list [--org ORG] | token revoke TOKEN        (admin API tokens; no --org = platform scope)
    crosslogic model add MODEL [--kind chat|completion|embedding] [--served-name S] [--context-length N]
                               [--max-output-tokens N] [--default-max-tokens N] [--max-n N] [--vram-gb N]
                               [--tokens-per-sec N] [--input-price DOLLARS] [--output-price DOLLARS]
    crosslogic model update MODEL [same flags as add]   (refuses an unknown MODEL instead of creating it)
    crosslogic model list
    crosslogic region add REGION [--name DISPLAY] [--fallback R,R] [--price-multiplier 1.2]
    crosslogic region list
    crosslogic node add NAME --region R --host H --port P [--models M,M] [--cloud C] [--spot|--no-spot]
                             [--gpu-type G] [--reserved-org ORG]
    crosslogic node list [--region R] | node remove NODE | node drain NODE

ORG and ENV are a UUID or a name; an environment name needs its org (`--org acme --env prod`). KEY is a
key_id, a display prefix (`clsk_live_1a2b3c`) or the plaintext key itself (e.g. to revoke a leaked key).
Prices are US dollars per 1M tokens (`--input-price 0.05`), stored exactly as integer micro-dollars; more
precision than one micro-dollar is refused. `model add`, `region add` and `node add` are upserts: flags left
out keep their current value. `--max-n` caps `n` (and completions' `best_of`) per request; default 128.

`key create` refuses an org or environment that is suspended (exit 1): such a key would be refused by the
gateway (403 tenant_suspended) until the org / environment is resumed. `--allow-suspended` creates it anyway
(e.g. to hand out keys before resuming) and says so on stderr. `key rotate` works in a suspended tenant (a
leaked key must be replaceable at any time) and says the new key is unusable until it is resumed.
`key create --test` makes a test key (`clsk_test_…`): served by the same nodes, its usage in the ledger at cost 0
and never billed, capped by `crosslogic limits set --test-keys` (docs/admin-api.md, "Test keys").

Every command takes `--json` (a JSON object or list on stdout) and `--actor` (the audit log's actor,
default $USER). The database and the key secret come from CROSSLOGIC_DATABASE_URL / CROSSLOGIC_KEY_SECRET
or from the running stack's `--state-dir`. Exit codes: 0 ok, 1 not found / conflict / database error,
2 bad arguments or missing configuration.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from crosslogic.commands.common import Action, Ctx, Output, col, csv_list, db_command, many, one, table
from crosslogic.keys import KEY_MODES
from crosslogic.store import admin_tokens, usage_queries
from crosslogic.store import tenancy as t

ORG_COLS = [col("name"), col("org_id", "ID"), col("status"), col("billing_plan", "PLAN"),
            col("reserved_tps", "RESERVED_TPS"), col("region_preferences", "REGIONS")]  # fmt: skip
ENV_COLS = [col("org_name", "ORG"), col("name"), col("env_id", "ID"), col("status"), col("region"),
            col("model_list", "MODELS"), col("quota_tokens_per_day", "QUOTA/DAY"),
            col("concurrency_limit", "CONCURRENCY")]  # fmt: skip
KEY_COLS = [col("key_prefix", "PREFIX"), col("key_id", "ID"), col("mode"), col("org_name", "ORG"),
            col("env_name", "ENV"), col("name"), col("role"), col("region"),
            col("rate_limit_tokens_per_min", "TOKENS/MIN"), col("status"), col("created_at", "CREATED"),
            col("revoked_at", "REVOKED")]  # fmt: skip
MODEL_COLS = [col("model_id", "MODEL"), col("kind"), col("served_name", "SERVED_AS"),
              col("context_length", "CONTEXT"), col("max_output_tokens", "MAX_OUT"),
              col("default_max_tokens", "DEFAULT_MAX"), col("max_n", "MAX_N"), col("vram_gb", "VRAM_GB"),
              col("tokens_per_sec", "TOK/S"),
              ("$IN/1M", lambda m: t.microdollars_to_dollars(m.input_price_microdollars_per_1m)),
              ("$OUT/1M", lambda m: t.microdollars_to_dollars(m.output_price_microdollars_per_1m)),
              col("status")]  # fmt: skip
REGION_COLS = [col("region_id", "REGION"), col("display_name", "NAME"),
               ("FALLBACK", lambda r: " > ".join(r.fallback_chain) or "-"),
               ("PRICE_X", lambda r: t.ppm_to_multiplier(r.price_multiplier_ppm)),
               col("status")]  # fmt: skip
USAGE_COLS = [("BUCKET", lambda r: r["bucket"]), ("GROUP", lambda r: r["group"] or "-"),
              ("REQUESTS", lambda r: r["requests"]), ("TOKENS", lambda r: r["total_tokens"]),
              ("COST_$", lambda r: t.microdollars_to_dollars(r["cost_microdollars"]))]
TOKEN_COLS = [col("token_prefix", "PREFIX"), col("token_id", "ID"), col("name"), col("role"),
              ("SCOPE", lambda x: x.org_name or "platform"), col("status"), col("expires_at", "EXPIRES"),
              col("last_used_at", "LAST_USED")]  # fmt: skip
NODE_COLS = [col("name"), col("region"), col("status"), col("status_reason", "REASON"), col("engine"),
             ("ENDPOINT", lambda n: f"{n.endpoint_host}:{n.endpoint_port}"), col("model_list", "MODELS"),
             col("cloud"), col("spot"), col("gpu_type", "GPU"), col("reserved_org_id", "RESERVED_FOR"),
             col("last_heartbeat_at", "HEARTBEAT")]  # fmt: skip


# --------------------------------------------------------------- actions


async def _org_create(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    org = await t.create_org(db, a.name, a.plan, a.region, a.reserved_tps, actor=c.actor)
    return one(org, ORG_COLS)


async def _org_list(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return many(await t.list_orgs(db), ORG_COLS)


def _org_status(status: str) -> Action:
    async def action(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
        return one(await t.set_org_status(db, a.org, status, actor=c.actor), ORG_COLS)

    return action


async def _env_create(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    env = await t.create_env(
        db, a.org, a.name, a.region, a.models, a.quota_tokens_per_day, a.concurrency_limit, actor=c.actor
    )
    return one(env, ENV_COLS)


async def _env_list(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return many(await t.list_envs(db, a.org), ENV_COLS)


def _env_status(status: str) -> Action:
    async def action(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
        return one(await t.set_env_status(db, a.env, status, a.org, actor=c.actor), ENV_COLS)

    return action


def _new_key(record: t.ApiKeyRecord, plaintext: str, headline: str) -> Output:
    text = (
        f"{table([record], KEY_COLS)}\n\n{headline}\n\n    {plaintext}\n\n"
        "Store it now: it cannot be shown again (only its hash is kept)."
    )
    return Output({**t.to_json(record), "api_key": plaintext}, text)


def _warn_if_suspended(record: t.ApiKeyRecord, suspended: str | None) -> None:
    if suspended:
        print(f"crosslogic: warning: {suspended} is suspended: key {record.key_prefix} is refused (403 "
              "tenant_suspended) until it is resumed", file=sys.stderr)


async def _key_create(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    assert c.secret is not None
    record, plaintext = await t.create_key(
        db, c.secret, a.org, a.env, a.name, a.region, a.role, a.rate_limit_tokens_per_min, actor=c.actor,
        allow_suspended=a.allow_suspended, expires_at=a.expires_at, mode="test" if a.test else "live",
    )
    _warn_if_suspended(record, await t.suspended_owner(db, record))
    headline = (f"Test API key (free, never billed; its limits: crosslogic limits show --key {record.key_prefix}):"
                if a.test else "API key:")
    return _new_key(record, plaintext, headline)


async def _key_list(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return many(await t.list_keys(db, a.org, a.env), KEY_COLS)


async def _key_revoke(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return one(await t.revoke_key(db, a.key, secret=c.secret, actor=c.actor), KEY_COLS)


async def _key_rotate(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    assert c.secret is not None
    record, plaintext = await t.rotate_key(db, c.secret, a.key, actor=c.actor, overlap_s=a.overlap)
    _warn_if_suspended(record, await t.suspended_owner(db, record))
    old = f"Key {a.key} works for {a.overlap} s more." if a.overlap else f"Key {a.key} is revoked."
    return _new_key(record, plaintext, f"{old} New API key:")


async def _usage_show(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    """The admin API's usage query (store/usage_queries.py), for an org or (no --org) the platform."""
    org_id = None if a.org is None else (await t.get_org(db, a.org)).org_id
    query = usage_queries.SeriesQuery(bucket=a.bucket, since=a.since, until=a.until, group_by=a.group_by,
                                      org_id=org_id, mode=a.mode)
    rows = await usage_queries.usage_series(db, query)
    return Output(rows, table(rows, USAGE_COLS))


async def _usage_month(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    month = await usage_queries.org_month(db, (await t.get_org(db, a.org)).org_id)
    free = month["free_tier"]
    text = "\n".join([
        f"org {month['org_name']} ({month['billing_plan']}), {month['month']}: {month['tokens']:,} tokens, "
        f"cost ${t.microdollars_to_dollars(month['cost_microdollars'])}, "
        f"owed ${t.microdollars_to_dollars(month['owed_microdollars'])}",
        "free tier: " + ("unlimited" if free["unlimited"] else
                         f"{free['remaining_tokens']:,} of {free['allowance_tokens']:,} tokens left"),
        f"reserved: {month['reserved_tokens_per_sec']} tokens/s; bill cap: "
        + ("none" if month["bill_cap_microdollars"] is None
           else "$" + t.microdollars_to_dollars(month["bill_cap_microdollars"]))])
    return Output(month, text)


async def _token_create(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    assert c.secret is not None
    record, plaintext = await admin_tokens.create_token(db, c.secret, a.role, a.org, a.name,
                                                        expires_at=a.expires_at, actor=c.actor)
    text = (f"{table([record], TOKEN_COLS)}\n\nAdmin token:\n\n    {plaintext}\n\n"
            "Store it now: it cannot be shown again (only its hash is kept).")
    return Output({**t.to_json(record), "token": plaintext}, text)


async def _token_list(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    org_id = None if a.org is None else (await t.get_org(db, a.org)).org_id
    return many(await admin_tokens.list_tokens(db, org_id), TOKEN_COLS)


async def _token_revoke(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return one(await admin_tokens.revoke_token(db, a.token, actor=c.actor), TOKEN_COLS)


def _model_upsert(*, must_exist: bool) -> Action:
    async def action(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
        def price(v: str | None) -> int | None:
            return None if v is None else t.dollars_to_microdollars(v)

        model = await t.add_model(
            db, a.model_id, a.kind, a.served_name, a.context_length, a.max_output_tokens,
            a.default_max_tokens, a.vram_gb, a.tokens_per_sec, price(a.input_price), price(a.output_price),
            a.max_n, actor=c.actor, must_exist=must_exist,
        )  # fmt: skip
        return one(model, MODEL_COLS)

    return action


async def _model_list(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return many(await t.list_models(db), MODEL_COLS)


async def _region_add(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    ppm = None if a.price_multiplier is None else t.multiplier_to_ppm(a.price_multiplier)
    region = await t.add_region(db, a.region_id, a.name, a.fallback, ppm, actor=c.actor)
    return one(region, REGION_COLS)


async def _region_list(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return many(await t.list_regions(db), REGION_COLS)


async def _node_add(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    node = await t.add_node(
        db, a.name, a.region, a.host, a.port, a.models, a.cloud, a.spot, a.gpu_type, a.reserved_org,
        actor=c.actor,
    )  # fmt: skip
    return one(node, NODE_COLS)


async def _node_list(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return many(await t.list_nodes(db, a.region), NODE_COLS)


async def _node_remove(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    node = await t.remove_node(db, a.node, actor=c.actor)
    return Output(t.to_json(node), f"removed node {node.name} ({node.node_id})")


async def _node_drain(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    return one(await t.set_node_status(db, a.node, "draining", actor=c.actor), NODE_COLS)


# --------------------------------------------------------------- parser


KEY_HELP = "key_id, display prefix (clsk_live_1a2b3c) or the key itself"


def _aware_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2027-01-01T00:00:00Z")
    return parsed


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the org / env / key / model / region / node commands to the main `crosslogic` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    common.add_argument("--actor", help="who to record in the audit log (default: $USER)")

    def group(name: str, help_text: str) -> argparse._SubParsersAction:
        parser = subparsers.add_parser(name, help=help_text)
        return parser.add_subparsers(dest=f"{name}_action", metavar="ACTION", required=True)

    def command(
        grp: argparse._SubParsersAction, name: str, help_text: str, action: Action, *, secret: bool = False
    ) -> argparse.ArgumentParser:
        parser = grp.add_parser(name, parents=[common], help=help_text, description=help_text)
        parser.set_defaults(handler=db_command(action, needs_secret=secret))
        return parser

    org = group("org", "organisations (tenants)")
    p = command(org, "create", "create an organisation", _org_create)
    p.add_argument("name", help="organisation name (unique)")
    p.add_argument("--plan", default="serverless", choices=t.BILLING_PLANS, help="billing plan")
    p.add_argument(
        "--region", action="extend", type=csv_list, default=[], help="preferred regions, first = default"
    )
    p.add_argument("--reserved-tps", type=int, default=0, help="reserved capacity, tokens/s")
    command(org, "list", "list organisations", _org_list)
    for verb, status in (("suspend", "suspended"), ("resume", "active")):
        command(org, verb, f"{verb} an organisation", _org_status(status)).add_argument("org", help="name or id")

    env = group("env", "environments inside an organisation")
    p = command(env, "create", "create an environment", _env_create)
    p.add_argument("name", help="environment name (unique in its org)")
    p.add_argument("--org", required=True, help="the owning organisation (name or id)")
    p.add_argument("--region", help="default region (else the org's)")
    p.add_argument("--models", action="extend", type=csv_list, default=[], help="allowed models (default: all)")
    p.add_argument("--quota-tokens-per-day", type=int, help="daily token quota (403 quota_exceeded beyond it)")
    p.add_argument("--concurrency-limit", type=int, help="requests in flight at once")
    command(env, "list", "list environments", _env_list).add_argument("--org", help="only this organisation's")
    for verb, status in (("suspend", "suspended"), ("resume", "active")):
        p = command(env, verb, f"{verb} an environment", _env_status(status))
        p.add_argument("env", help="name or id")
        p.add_argument("--org", help="needed when ENV is a name")

    key = group("key", "API keys")
    p = command(key, "create", "create an API key (shown once)", _key_create, secret=True)
    p.add_argument("--org", help="needed when --env is a name")
    p.add_argument("--env", required=True, help="the key's environment (name or id)")
    p.add_argument("--name", default="", help="a label for the key")
    p.add_argument("--region", help="pin the key to a region")
    p.add_argument("--role", default="developer", choices=t.KEY_ROLES, help="the key's role (default: developer)")
    p.add_argument("--rate-limit-tokens-per-min", type=int, help="the key's own tokens-per-minute limit")
    p.add_argument("--allow-suspended", action="store_true",
                   help="create the key even if its org or environment is suspended (it is refused until resumed)")
    p.add_argument("--expires-at", type=_aware_time, metavar="TIME",
                   help="the key stops working then (ISO 8601 with a zone, e.g. 2027-01-01T00:00:00Z)")
    p.add_argument("--test", action="store_true",
                   help="a test key (clsk_test_…): same models and nodes, usage shown but never billed, low "
                        "limits of its own (crosslogic limits set --test-keys …)")
    p = command(key, "list", "list API keys (never the keys themselves)", _key_list)
    p.add_argument("--org", help="only this organisation's")
    p.add_argument("--env", help="only this environment's")
    command(key, "revoke", "revoke an API key", _key_revoke).add_argument("key", help=KEY_HELP)
    p = command(key, "rotate", "replace an API key by a new one", _key_rotate, secret=True)
    p.add_argument("key", help=KEY_HELP)
    p.add_argument("--overlap", type=int, default=0, metavar="SECONDS",
                   help="keep the old key working this long, so clients switch without downtime (default 0: "
                        "revoke it now, e.g. a leaked key)")

    usage = group("usage", "usage and cost out of the ledger")
    p = command(usage, "show", "tokens, requests and cost per hour or day", _usage_show)
    p.add_argument("--org", help="one organisation (default: every org)")
    p.add_argument("--bucket", default="hour", choices=usage_queries.BUCKETS, help="hour or day (UTC)")
    p.add_argument("--group-by", choices=list(usage_queries.GROUPS),
                   help="break down by model, region, key, env, mode (live / test keys), org")
    p.add_argument("--mode", choices=KEY_MODES, help="only live or only test keys' usage (test usage costs 0)")
    p.add_argument("--since", type=_aware_time, metavar="TIME", help="start (default: 24 buckets before --until)")
    p.add_argument("--until", type=_aware_time, metavar="TIME", help="end (default: now)")
    p = command(usage, "month", "an org's month so far: cost, free tier left, reserved capacity, cap", _usage_month)
    p.add_argument("--org", required=True, help="the organisation (name or id)")

    token = group("token", "admin tokens (admin API and developer dashboard)")
    p = command(token, "create", "create an admin token (shown once)", _token_create, secret=True)
    p.add_argument("--role", required=True, choices=admin_tokens.ADMIN_ROLES, help="admin, developer or read-only")
    p.add_argument("--org", help="scope it to this organisation (default: the whole platform)")
    p.add_argument("--name", default="", help="a label for the token")
    p.add_argument("--expires-at", type=_aware_time, metavar="TIME", help="the token stops working then")
    command(token, "list", "list admin tokens (never the tokens)", _token_list).add_argument(
        "--org", help="only this organisation's")
    command(token, "revoke", "revoke an admin token", _token_revoke).add_argument("token", help="token id or prefix")

    model = group("model", "model catalogue")
    for verb, help_text, must_exist in (("add", "add or update a model", False),
                                        ("update", "update an existing model", True)):
        p = command(model, verb, help_text, _model_upsert(must_exist=must_exist))
        p.add_argument("model_id", metavar="MODEL", help="public model id clients send")
        p.add_argument("--kind", choices=t.MODEL_KINDS, help="which endpoints serve it")
        p.add_argument("--served-name", help="name the inference node serves (default: MODEL)")
        for flag, flag_help in (("--context-length", "context window in tokens"),
                                ("--max-output-tokens", "largest max_tokens a request may ask for"),
                                ("--default-max-tokens", "max_tokens reserved when a request gives none"),
                                ("--vram-gb", "GPU memory one replica needs"),
                                ("--tokens-per-sec", "decode throughput of one replica")):  # fmt: skip
            p.add_argument(flag, type=int, help=flag_help)
        p.add_argument("--max-n", type=int, help="most choices (n, best_of) per request (default 128)")
        p.add_argument("--input-price", metavar="DOLLARS", help="US$ per 1M input tokens, e.g. 0.05")
        p.add_argument("--output-price", metavar="DOLLARS", help="US$ per 1M output tokens")
    command(model, "list", "list models", _model_list)

    region = group("region", "regions")
    p = command(region, "add", "add or update a region", _region_add)
    p.add_argument("region_id", metavar="REGION", help="region id, e.g. ap-south")
    p.add_argument("--name", help="display name, e.g. Mumbai")
    p.add_argument(
        "--fallback", action="extend", type=csv_list, help="regions tried in order when this one is full"
    )
    p.add_argument("--price-multiplier", metavar="X", help="e.g. 1.2 (exact to 1 ppm)")
    command(region, "list", "list regions", _region_list)

    node = group("node", "inference nodes")
    p = command(node, "add", "add or update a node", _node_add)
    p.add_argument("name", help="node name (unique)")
    p.add_argument("--region", required=True, help="region the node serves")
    p.add_argument("--host", required=True, help="address Envoy reaches the engine at")
    p.add_argument("--port", required=True, type=int, help="the engine's port")
    p.add_argument("--models", action="extend", type=csv_list, help="models the node serves")
    p.add_argument("--cloud", help="cloud or on-prem pool")
    p.add_argument("--spot", action=argparse.BooleanOptionalAction, help="a spot / preemptible instance")
    p.add_argument("--gpu-type", help="GPU model (FinOps)")
    p.add_argument("--reserved-org", help="dedicate the node to one org")
    command(node, "list", "list nodes", _node_list).add_argument("--region", help="only this region's")
    command(node, "remove", "delete a node", _node_remove).add_argument("node", help="name or id")
    command(node, "drain", "stop sending new requests to a node", _node_drain).add_argument("node", help="name or id")
