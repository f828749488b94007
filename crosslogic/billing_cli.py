"""`crosslogic billing …` and `crosslogic finops …`: run the reporter, reconcile, serve a local Stripe."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path


def _settings(args: argparse.Namespace):
    from crosslogic.runtime.state import resolve_settings

    return resolve_settings(Path(args.state_dir))


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
    from crosslogic.cli import _run_service, _split_listen

    host, port = _split_listen(args.listen)
    return _run_service(lambda: serve_local_stripe(host, port))


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
    local = actions.add_parser("stripe-local", help="serve a local Stripe-compatible API (tests, demos)")
    local.add_argument("--listen", default="127.0.0.1:12111")
    local.set_defaults(handler=_stripe_local)

    finops = sub.add_parser("finops", help="internal cost model: GPU cost, cost per token, margins")
    finops_actions = finops.add_subparsers(dest="finops_command", required=True)
    report = finops_actions.add_parser("report", help="revenue, GPU cost and margin per model and region")
    report.add_argument("--since", help="window start (ISO 8601, default: start of this month, UTC)")
    report.add_argument("--until", help="window end (ISO 8601, default: now)")
    report.add_argument("--json", action="store_true")
    report.set_defaults(handler=_finops_report)
