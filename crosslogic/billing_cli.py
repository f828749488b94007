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


def _stripe_local(args: argparse.Namespace) -> int:
    from crosslogic.accounting.stripe_local import serve_local_stripe
    from crosslogic.cli import _run_service, _split_listen

    host, port = _split_listen(args.listen)
    return _run_service(lambda: serve_local_stripe(host, port))


def register(sub: argparse._SubParsersAction) -> None:
    billing = sub.add_parser("billing", help="Stripe metering, reconciliation")
    actions = billing.add_subparsers(dest="billing_command", required=True)
    run = actions.add_parser("run", help="export unbilled usage to Stripe once (safe to repeat)")
    run.set_defaults(handler=_billing_run)
    local = actions.add_parser("stripe-local", help="serve a local Stripe-compatible API (tests, demos)")
    local.add_argument("--listen", default="127.0.0.1:12111")
    local.set_defaults(handler=_stripe_local)
