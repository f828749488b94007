"""`crosslogic billing …` and `crosslogic finops …`: run the reporter, reconcile, serve a local Stripe."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from datetime import datetime


def _settings(args: argparse.Namespace):
    from crosslogic.runtime.state import resolve_settings

    return resolve_settings(args.state_dir)


def _billing_run(args: argparse.Namespace) -> int:
    from crosslogic.accounting.reporter import BillingReporter, ReporterSettings, stripe_client
    from crosslogic.store.db import open_pool

    settings = _settings(args)
    if not settings.stripe_api_key:
        raise SystemExit("CROSSLOGIC_STRIPE_API_KEY is not set")

    async def run() -> dict:
        async with open_pool(settings.require_database(), min_size=1, max_size=2) as pool:
            reporter = BillingReporter(pool, stripe_client(settings.stripe_api_key, settings.stripe_api_base),
                                       ReporterSettings(interval_s=settings.billing_interval_s,
                                                        retry_base_s=settings.billing_retry_base_s))
            return asdict(await reporter.run_once())

    print(json.dumps(asyncio.run(run())))
    return 0


def _billing_reconcile(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from crosslogic.accounting.reconcile import reconcile
    from crosslogic.accounting.reporter import month_bounds, stripe_client
    from crosslogic.store.db import open_pool

    settings = _settings(args)
    if not settings.stripe_api_key:
        raise SystemExit("CROSSLOGIC_STRIPE_API_KEY is not set")
    now = datetime.now(UTC)
    start = datetime.fromisoformat(args.since) if args.since else month_bounds(now)[0]
    end = datetime.fromisoformat(args.until) if args.until else now + timedelta(minutes=1)

    async def run() -> dict:
        async with open_pool(settings.require_database(), min_size=1, max_size=2) as pool:
            client = stripe_client(settings.stripe_api_key, settings.stripe_api_base)
            return (await reconcile(pool, client, start, end, requeue_missing=not args.no_requeue)).as_dict()

    print(json.dumps(asyncio.run(run()), indent=2))
    return 0


def _stripe_local(args: argparse.Namespace) -> int:
    from crosslogic.accounting.stripe_local import serve_local_stripe
    from crosslogic.commands.process import run_service, split_listen

    host, port = split_listen(args.listen)
    return run_service(lambda: serve_local_stripe(host, port))


def _usd(microdollars: int) -> str:
    sign = "-" if microdollars < 0 else ""
    whole, frac = divmod(abs(microdollars), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def _finops_report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    import asyncpg

    from crosslogic.accounting.finops import load_report
    from crosslogic.accounting.reporter import month_bounds

    settings = _settings(args)
    now = datetime.now(UTC)
    start = datetime.fromisoformat(args.since) if args.since else month_bounds(now)[0]
    end = datetime.fromisoformat(args.until) if args.until else now + timedelta(minutes=1)

    async def run() -> list[dict]:
        conn = await asyncpg.connect(settings.require_database())
        try:
            return await load_report(conn, start, end)
        finally:
            await conn.close()

    rows = asyncio.run(run())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'region':<14}{'model':<16}{'tokens':>12}{'revenue $':>12}{'billed $':>12}{'GPU cost $':>12}"
          f"{'margin $':>12}{'GPU $/1M tok':>14}")
    for r in rows:
        per_1m = r["gpu_cost_per_1m_tokens_microdollars"]
        print(f"{r['region']:<14}{r['model']:<16}{r['tokens']:>12,}{_usd(r['revenue_microdollars']):>12}"
              f"{_usd(r['billed_microdollars']):>12}{_usd(r['gpu_cost_microdollars']):>12}"
              f"{_usd(r['margin_microdollars']):>12}{'-' if per_1m is None else _usd(per_1m):>14}")
    return 0


def _terms_action(args: argparse.Namespace) -> int:
    """org-terms / price / gpu-price: small writes through crosslogic.store.billing_terms."""
    import sys

    import asyncpg

    from crosslogic.store import billing_terms
    from crosslogic.store.tenancy import InvalidArgument, TenancyError

    settings = _settings(args)

    async def run() -> object:
        conn = await asyncpg.connect(settings.require_database())
        try:
            if args.billing_command == "org-terms":
                terms = await billing_terms.set_org_terms(
                    conn, args.org, cap_usd=args.cap_usd, clear_cap=args.no_cap, suspend_at_cap=args.suspend_at_cap,
                    free_tokens=args.free_tokens, discount=args.discount, tier=args.tier,
                    stripe_customer=args.stripe_customer, cap_fail_closed=args.cap_fail_closed)
                return asdict(terms)
            if args.billing_command == "price":
                starts = datetime.fromisoformat(args.effective_from) if args.effective_from else None
                version = await billing_terms.schedule_price(conn, args.model, args.input_usd, args.output_usd, starts)
                return {"price_version_id": version}
            await billing_terms.set_gpu_price(conn, args.gpu_type, args.cloud, args.spot, args.usd_per_hour)
            return {"gpu_type": args.gpu_type, "cloud": args.cloud, "spot": args.spot,
                    "usd_per_hour": args.usd_per_hour}
        finally:
            await conn.close()

    try:
        print(json.dumps(asyncio.run(run()), default=str))
    except InvalidArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TenancyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    billing = sub.add_parser("billing", help="Stripe metering, reconciliation")
    actions = billing.add_subparsers(dest="billing_command", required=True)
    run = actions.add_parser("run", help="export unbilled usage to Stripe once (safe to repeat)")
    run.set_defaults(handler=_billing_run)
    rec = actions.add_parser("reconcile", help="ledger vs Stripe vs node counters; re-send missing exports")
    rec.add_argument("--since", help="window start (ISO 8601, default: start of this month, UTC)")
    rec.add_argument("--until", help="window end (ISO 8601, default: now)")
    rec.add_argument("--no-requeue", action="store_true", help="report only; do not re-send missing exports")
    rec.set_defaults(handler=_billing_reconcile)
    terms = actions.add_parser("org-terms", help="an org's bill cap, free tier, discount, tier, Stripe customer")
    terms.add_argument("org", help="org name or id")
    cap = terms.add_mutually_exclusive_group()
    cap.add_argument("--cap-usd", help="monthly bill cap in dollars, on what the org owes after its free tier "
                     "(each request reserves its maximum cost; over the cap: 403 billing_cap_reached)")
    cap.add_argument("--no-cap", action="store_true", help="remove the bill cap")
    terms.add_argument("--suspend-at-cap", action=argparse.BooleanOptionalAction, default=None,
                       help="suspend the org when it reaches its cap")
    terms.add_argument("--cap-fail-closed", action=argparse.BooleanOptionalAction, default=None,
                       help="while Valkey is unreachable, refuse the org's requests (503) instead of checking the "
                            "cap against the ledger after the fact (the default)")
    terms.add_argument("--free-tokens", type=int, help="free tokens per month (serverless plans)")
    terms.add_argument("--discount", help="fraction off every price, e.g. 0.15")
    terms.add_argument("--tier", help="pricing tier id")
    terms.add_argument("--stripe-customer", help="Stripe customer id (cus_…)")
    terms.set_defaults(handler=_terms_action)
    price = actions.add_parser("price", help="a new price version for a model (now or later, never earlier)")
    price.add_argument("model", help="model id")
    price.add_argument("--input-usd", required=True, help="dollars per 1M input tokens")
    price.add_argument("--output-usd", required=True, help="dollars per 1M output tokens")
    price.add_argument("--from", dest="effective_from", help="ISO 8601 start with time zone (default: now)")
    price.set_defaults(handler=_terms_action)
    gpu = actions.add_parser("gpu-price", help="what a GPU costs per hour (FinOps)")
    gpu.add_argument("gpu_type", help="GPU model, as nodes report it")
    gpu.add_argument("cloud", help="cloud or on-prem pool")
    gpu.add_argument("--usd-per-hour", required=True, help="dollars per GPU-hour")
    gpu.add_argument("--spot", action="store_true", help="the spot price (else on-demand)")
    gpu.set_defaults(handler=_terms_action)
    local = actions.add_parser("stripe-local", help="serve a local Stripe-compatible API (tests, demos)")
    local.add_argument("--listen", default="127.0.0.1:12111", help="host:port (default: 127.0.0.1:12111)")
    local.set_defaults(handler=_stripe_local)

    finops = sub.add_parser("finops", help="internal cost model: GPU cost, cost per token, margins")
    finops_actions = finops.add_subparsers(dest="finops_command", required=True)
    report = finops_actions.add_parser("report", help="revenue, GPU cost and margin per model and region")
    report.add_argument("--since", help="window start (ISO 8601, default: start of this month, UTC)")
    report.add_argument("--until", help="window end (ISO 8601, default: now)")
    report.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    report.set_defaults(handler=_finops_report)
