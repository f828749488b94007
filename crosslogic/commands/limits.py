"""`crosslogic limits …`: see and edit rate limits, quotas and layer policy; see the limiter's live state.

    crosslogic limits show (--key KEY | --env ENV [--org ORG] | --org ORG)
    crosslogic limits set TARGET [--tokens-per-sec N] [--tokens-per-min N] [--requests-per-min N]
                                 [--tokens-per-day N] [--concurrency N] [--reserved-tokens-per-sec N]
                                 [--quota-tokens-per-day N] [--quota-tokens-per-hour N] [--max-request-bytes N]
                                 [--max-tokens-per-request N] [--shadow | --no-shadow] [--shadow-limits KIND,...]
                                 [--fail-open | --fail-closed]
    crosslogic limits clear TARGET (SETTING... | --all)
    crosslogic limits usage --key KEY

TARGET is one of --org ORG, --env ENV [--org ORG], --key KEY, --global, --region REGION, --plan PLAN (plan
defaults), --layer LAYER (failure policy and shadow mode of a whole layer: global, region, org, env, key) or
--test-keys (the caps of every test key: tokens/requests per minute, concurrency, max tokens per request).
`show` prints every layer's effective limit per kind as the limiter reads it and where it comes from (plan
default, override, platform limit); `clear` puts a setting back to its default (inherit / unlimited, no
reserved capacity, fail-open, no shadow mode). Settings are checked before anything is written; a change
reaches running ext_authz processes through the NOTIFY triggers of the limit tables, and is audited.
Flags, output (`--json`), `--actor` and exit codes as in commands/tenancy.py.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from crosslogic.commands.common import Ctx, Output, db_command, table
from crosslogic.ratelimit import explain, live
from crosslogic.ratelimit.connect import redis_client
from crosslogic.ratelimit.engine import wall_clock_ms
from crosslogic.settings import Settings
from crosslogic.store import limit_overrides as lo
from crosslogic.store import tenancy as t

# Every numeric setting any target has (one --flag each; the target decides which it accepts).
NUMBER_SETTINGS = tuple(dict.fromkeys(name for target in lo.TARGETS.values()
                                      for name, column in target.settings.items()
                                      if not (column.flag or column.kinds)))
FLAG_SETTINGS = ("shadow", "shadow_limits", "fail_open")
TARGET_FLAGS = ("key", "env", "org", "global_", "region", "plan", "layer", "test_keys")


class _RedisUnavailable(t.TenancyError):
    pass


def _target(a: argparse.Namespace) -> tuple[str, str | None]:
    """(layer, reference) of the one target given; --org may accompany --env as the env name's owner."""
    given = [f for f in TARGET_FLAGS if getattr(a, f, None) not in (None, False)]
    if "env" in given and "org" in given:
        given.remove("org")
    if len(given) != 1:
        raise t.InvalidArgument("name exactly one target: --org, --env [--org], --key, --global, --region, "
                                "--plan, --layer or --test-keys")
    layer = given[0].rstrip("_")
    return layer, None if layer in ("global", "test_keys") else getattr(a, given[0])


async def _resolve(db: Any, a: argparse.Namespace, c: Ctx) -> lo.Ref:
    layer, ref = _target(a)
    return await lo.resolve(db, layer, ref, org=a.org if layer == "env" else None, secret=c.secret)


def _change_output(change: lo.Change) -> Output:
    rows = [{"setting": k, "from": a, "to": b} for k, (a, b) in change.changes.items()]
    changes = table(rows, [("SETTING", lambda r: r["setting"]), ("FROM", lambda r: r["from"]),
                           ("TO", lambda r: r["to"])])
    note = ("Saved. Running ext_authz / rate-limit processes drop their cached limits when Postgres notifies "
            "them (milliseconds; CROSSLOGIC_LIMITS_CACHE_TTL seconds at most should a notification be lost).")
    return Output(change.as_json(), f"{change.layer} {change.label}\n{changes}\n{note}")


async def _set(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    values = {s: getattr(a, s) for s in NUMBER_SETTINGS + FLAG_SETTINGS if getattr(a, s) is not None}
    ref = await _resolve(db, a, c)
    return _change_output(await lo.set_limits(db, ref, values, actor=c.actor))


async def _clear(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    if bool(a.settings) == a.all:
        raise t.InvalidArgument("name the settings to clear, or --all")
    settings = None if a.all else [s.replace("-", "_") for s in a.settings]
    ref = await _resolve(db, a, c)
    return _change_output(await lo.clear_limits(db, ref, settings, actor=c.actor))


async def _subject(db: Any, a: argparse.Namespace, c: Ctx, *, key_only: bool = False) -> dict[str, Any]:
    """Who `show` / `usage` is about: ids per tenant layer, names, and the region its requests use
    (key, else env, else the org's first preference, else the default region: as ext_authz picks it)."""
    key_ref, env_ref, org_ref = a.key, getattr(a, "env", None), getattr(a, "org", None)
    if key_only and not key_ref:
        raise t.InvalidArgument("usage needs --key")
    key = env = None
    if key_ref:
        key = await t.get_key(db, key_ref, secret=c.secret)
        env, org = await t.get_env(db, key.env_id), await t.get_org(db, key.org_id)
        title = f"{key.mode} key {key.key_prefix}"
    elif env_ref:
        env = await t.get_env(db, env_ref, org_ref)
        org = await t.get_org(db, env.org_id)
        title = "environment"
    elif org_ref:
        org = await t.get_org(db, org_ref)
        title = "org"
    else:
        raise t.InvalidArgument("name --key, --env [--org] or --org")
    ids = {"org": org.org_id, **({"env": env.env_id} if env else {}), **({"key": key.key_id} if key else {})}
    names = {"org": org.name, **({"env": env.name} if env else {})}
    of = " of " if key else " "
    return {"ids": ids, "title": f"{title}{of}{'/'.join(names.values())}", "names": names,
            "region": explain.request_region(Settings().default_region, org, env, key),
            "org": org, "env": env, "key": key}


LIMIT_COLS = [("LAYER", lambda r: r["layer"]), ("ID", lambda r: r["id"]), ("KIND", lambda r: r["kind"]),
              ("LIMIT", lambda r: r["value"]), ("SOURCE", lambda r: r["source"])]
POLICY_COLS = [("LAYER", lambda v: v.layer), ("SHADOW", lambda v: v.shadow),
               ("SHADOW_SOURCE", lambda v: v.shadow_source),
               ("SHADOW_LIMITS", lambda v: ",".join(v.shadow_limits) or "-"), ("FAIL_OPEN", lambda v: v.fail_open)]
QUOTA_COLS = [("LEVEL", lambda q: q[0]), ("SETTING", lambda q: q[1].kind), ("VALUE", lambda q: q[1].value),
              ("SOURCE", lambda q: q[1].source)]


async def _show(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    who = await _subject(db, a, c)
    ids, view = await explain.limits_in_force(db, Settings().default_region, who["org"], who["env"], who["key"])
    rows = [{"layer": v.layer, "id": v.ident, "kind": lim.kind, "value": lim.value, "source": lim.source}
            for v in view.layers for lim in v.limits]
    text = "\n\n".join([f"{who['title']} (plan {view.plan}, region {view.region})", table(rows, LIMIT_COLS),
                        table(view.layers, POLICY_COLS), table(view.quotas, QUOTA_COLS)])
    return Output({"ids": ids, "names": who["names"], **view.as_json()}, text)


USAGE_COLS = [("LAYER", lambda r: r["layer"]), ("ID", lambda r: r["id"]), ("KIND", lambda r: r["kind"]),
              ("LEVEL", lambda r: r["level"]), ("CAPACITY", lambda r: r["capacity"])]
LEASE_COLS = [("LAYER", lambda u: u.layer), ("ID", lambda u: u.ident), ("LEASES", lambda u: u.leases),
              ("CONCURRENCY", lambda u: u.concurrency), ("CHARGED", lambda u: u.charged)]
QUOTA_USE_COLS = [("LEVEL", lambda q: q.level), ("PERIOD", lambda q: q.period), ("USED", lambda q: q.used),
                  ("QUOTA", lambda q: q.quota)]


async def _usage(db: Any, a: argparse.Namespace, c: Ctx) -> Output:
    who = await _subject(db, a, c, key_only=True)
    if not c.redis_url:
        raise t.InvalidArgument("no Redis: set CROSSLOGIC_REDIS_URL or start the stack (crosslogic up)")
    ids = who["ids"]
    reading = await explain.read_limits(db, ids["org"], ids["env"], ids["key"])
    redis = redis_client(c.redis_url, Settings().redis_cluster, connect_timeout=2.0, timeout=2.0)
    try:
        usage = await live.key_usage(redis, ids, who["region"], reading, wall_clock_ms(), datetime.now(UTC))
    except (OSError, aioredis.RedisError) as e:
        raise _RedisUnavailable(f"cannot read the limiter state from Redis: {e}") from None
    finally:
        await redis.aclose()
    rows = [{"layer": u.layer, "id": u.ident, "kind": b.kind, "level": b.level, "capacity": b.capacity}
            for u in usage.layers for b in u.buckets]
    text = "\n\n".join([f"{who['title']} (region {who['region']}), now", table(rows, USAGE_COLS),
                        table(usage.layers, LEASE_COLS), table(usage.quotas, QUOTA_USE_COLS)])
    return Output({"ids": ids, "region": who["region"], **usage.as_json()}, text)


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--org", help="an organisation (or the owner of --env given by name)")
    p.add_argument("--env", help="an environment (a name needs --org)")
    p.add_argument("--key", help="an API key: key_id, display prefix or the key itself")
    p.add_argument("--global", dest="global_", action="store_true", help="the global platform layer")
    p.add_argument("--region", help="a region's platform layer")
    p.add_argument("--plan", help="a billing plan's defaults")
    p.add_argument("--layer", help="a whole layer's failure policy and shadow mode")
    p.add_argument("--test-keys", dest="test_keys", action="store_true",
                   help="the caps every test key gets (its own limits can only be lower)")


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    common.add_argument("--actor", help="who to record in the audit log (default: $USER)")
    group = subparsers.add_parser("limits", help="rate limits, quotas and layer policy")
    actions = group.add_subparsers(dest="limits_action", metavar="ACTION", required=True)

    def command(name: str, help_text: str, action) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        parser.set_defaults(handler=db_command(action))
        return parser

    p = command("show", "effective limits per layer and kind, and where each comes from", _show)
    p.add_argument("--key", help="an API key: key_id, display prefix or the key itself")
    p.add_argument("--env", help="an environment (a name needs --org)")
    p.add_argument("--org", help="an organisation")
    p = command("set", "change limits, quotas, caps, shadow mode or failure policy (checked first)", _set)
    _add_target(p)
    for setting in NUMBER_SETTINGS:
        p.add_argument(f"--{setting.replace('_', '-')}", dest=setting, type=int, metavar="N",
                       help=f"{setting.replace('_', ' ')} (`limits clear` goes back to inherit)")
    p.add_argument("--shadow", action=argparse.BooleanOptionalAction, help="decide and log, never refuse")
    p.add_argument("--shadow-limits", dest="shadow_limits", metavar="KIND[,KIND]",
                   type=lambda v: [k for k in v.split(",") if k],
                   help="only these limits in shadow mode (one rule), e.g. tokens_per_day; '' for none")
    policy = p.add_mutually_exclusive_group()
    policy.add_argument("--fail-open", dest="fail_open", action="store_const", const=True,
                        help="admit while Redis is unreachable (--layer only)")
    policy.add_argument("--fail-closed", dest="fail_open", action="store_const", const=False,
                        help="refuse with 503 while Redis is unreachable (--layer only)")
    p = command("clear", "put settings back to their defaults (inherit / unlimited)", _clear)
    _add_target(p)
    p.add_argument("settings", nargs="*", metavar="SETTING", help="e.g. tokens_per_min concurrency")
    p.add_argument("--all", action="store_true", help="every setting of the target")
    p = command("usage", "live limiter state of a key: bucket levels, leases, tokens charged, quotas", _usage)
    p.add_argument("--key", help="an API key: key_id, display prefix or the key itself")
