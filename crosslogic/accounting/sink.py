"""The gRPC access-log sink (envoy.service.accesslog.v3): every finished request -> the ledger."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from crosslogic.accounting import metrics
from crosslogic.accounting.backstop import BackstopReplayer, UsageLogTailer, envoy_reopen_logs, run_exclusively
from crosslogic.accounting.guardrails import watch_caps
from crosslogic.accounting.ledger import HeldRows, LedgerWriter, OwedHook
from crosslogic.accounting.recent import RecentIds
from crosslogic.accounting.reporter import BillingReporter, ReporterSettings, stripe_client
from crosslogic.accounting.usage import UsageRecord, record_from_entry
from crosslogic.contract import PRICES_CHANNEL
from crosslogic.logs import request_context
from crosslogic.ratelimit.connect import redis_client
from crosslogic.runtime import internal_tls
from crosslogic.runtime.grpc_server import grpc_server
from crosslogic.runtime.ops_http import ops_server
from crosslogic.runtime.readiness import Readiness, postgres_check, redis_check
from crosslogic.settings import Settings
from crosslogic.store.db import follow_notifications, open_pool

log = logging.getLogger("crosslogic.accounting")


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, ledger: LedgerWriter, settle: Callable[[UsageRecord], None] | None = None) -> None:
        self.ledger = ledger
        self.settle = settle  # rate-limit settlement hook (crosslogic.ratelimit.settlement)

    async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802 (gRPC name)
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                record = record_from_entry(entry)
                if record is not None:
                    with request_context(record.request_id):
                        log.debug("usage of %s %s in %s: %d+%d tokens, status %d, %d ms", record.endpoint,
                                  record.model, record.region, record.prompt_tokens, record.completion_tokens,
                                  record.status_code, record.latency_ms)
                    metrics.record_finished(record)
                    self.ledger.add(record)
                    if self.settle is not None:
                        self.settle(record)
        return als_pb2.StreamAccessLogsResponse()


def _start_backstop(settings: Settings, pool, settle: Callable[[UsageRecord], None] | None,
                    committed: RecentIds, on_owed: OwedHook | None) -> asyncio.Task | None:
    if not settings.usage_log_path:
        return None
    path = Path(settings.usage_log_path)
    tailer = UsageLogTailer(path, path.with_name(path.name + ".position"))
    reopen = envoy_reopen_logs(settings.envoy_admin_url) if settings.envoy_admin_url else None
    replayer = BackstopReplayer(tailer, pool, rotate_bytes=settings.usage_log_rotate_bytes, reopen=reopen,
                                settle=settle, committed=committed, on_owed=on_owed,
                                grace_s=settings.backstop_grace_s)
    return asyncio.create_task(run_exclusively(replayer, path.with_name(path.name + ".lock")))


def _start_reporter(settings: Settings, pool) -> asyncio.Task | None:
    from crosslogic.settings import SupervisorSettings

    if SupervisorSettings().airgap:  # billing by flat licence (extauthz/license_guard.py); never a call out
        metrics.export_enabled.set(0)
        if settings.stripe_api_key:
            log.warning("air-gapped mode: CROSSLOGIC_STRIPE_API_KEY is ignored, nothing is exported to Stripe")
        return None
    metrics.export_enabled.set(1 if settings.stripe_api_key else 0)
    if not settings.stripe_api_key:
        log.info("no CROSSLOGIC_STRIPE_API_KEY: usage is recorded but not exported to Stripe")
        return None
    reporter = BillingReporter(pool, stripe_client(settings.stripe_api_key, settings.stripe_api_base),
                               ReporterSettings(interval_s=settings.billing_interval_s,
                                                retry_base_s=settings.billing_retry_base_s))
    return asyncio.create_task(reporter.run_forever())


async def _retry_held_rows(settings: Settings, held: HeldRows) -> None:
    """Held rows (no price version at their time) are retried whenever a version is recorded, and periodically."""
    await follow_notifications(settings.require_database(), [PRICES_CHANNEL], lambda _c, _p: held.wake.set(),
                               held.wake.set, "price change feed")


async def serve_accounting(settings: Settings, listen: str, site_listen: str | None = None) -> None:
    """`site_listen`: also serve the site API over mutual TLS there (crosslogic/sites/cloud_api.py): sites sync
    their org's views and push their spooled usage into this ledger."""
    from crosslogic.ratelimit.money import money_settlement
    from crosslogic.ratelimit.settlement import settlement_hook

    # min_size=0: the sink must start, take access-log entries and settle reservations while Postgres is
    # down (a sink restarted during an outage otherwise stalls settlement and leases pile up: measured 439
    # spurious 429s in the chaos test); ledger writes retry until Postgres is back.
    async with open_pool(settings.require_database(), min_size=0, max_size=4) as pool, \
            settlement_hook(settings) as settler, money_settlement(settings) as on_owed:
        settle = settler.submit if settler is not None else None
        committed = RecentIds()
        ledger = LedgerWriter(pool, settings.ledger_batch_size, settings.ledger_flush_interval_s, committed,
                              on_owed)
        writer = asyncio.create_task(ledger.run())
        held = HeldRows(pool, on_owed)
        held_task = asyncio.create_task(held.run())
        held_feed = asyncio.create_task(_retry_held_rows(settings, held))
        backstop = _start_backstop(settings, pool, settle, committed, on_owed)
        reporter = _start_reporter(settings, pool)
        guardrails = asyncio.create_task(watch_caps(pool, settings.guardrail_interval_s))
        sink = AccessLogSink(ledger, settle)
        # Readiness: the ledger's Postgres answers a query, and the Valkey settlement writes to answers PING.
        readiness = Readiness().add("postgres", postgres_check(pool))
        ping = redis_client(settings.redis_url, settings.redis_cluster, connect_timeout=0.5, timeout=0.5) \
            if settings.redis_url else None
        if ping is not None:
            readiness.add("valkey", redis_check(ping))
        try:
            async with AsyncExitStack() as sites, ops_server(settings.accounting_metrics_port, "accounting",
                                                              readiness, settings.metrics_host), \
                    grpc_server(listen, lambda s: als_pb2_grpc.add_AccessLogServiceServicer_to_server(sink, s),
                                "access-log sink", grace_s=2, readiness=readiness,
                                services=["envoy.service.accesslog.v3.AccessLogService"],
                                credentials=internal_tls.grpc_credentials(
                                    internal_tls.service_identity(settings.internal_tls_dir, "accounting"))) as server:
                if site_listen:
                    from crosslogic.settings import SchedulerSettings
                    from crosslogic.sites.cloud_api import site_api_server

                    pki_dir = SchedulerSettings().pki_dir
                    if not pki_dir:
                        raise SystemExit("--site-listen needs CROSSLOGIC_PKI_DIR (the CA of site certificates)")
                    await sites.enter_async_context(site_api_server(
                        site_listen, pool, Path(pki_dir), settings.require_key_secret().decode(),
                        settings.default_region, settler.submit_and_wait if settler is not None else None,
                        redis_client(settings.redis_url, settings.redis_cluster, connect_timeout=0.5, timeout=0.5)
                        if settings.redis_url else None, on_owed))
                await server.wait_for_termination()
        finally:  # after the server stopped: every entry that arrived is in `ledger`
            if ping is not None:
                await ping.aclose()
            writer.cancel()
            for task in (backstop, reporter, guardrails, held_task, held_feed):
                if task is not None:
                    task.cancel()
            try:
                await ledger.flush()  # what arrived before shutdown still reaches the ledger
            except Exception as exc:  # noqa: BLE001 - last chance; report what is lost
                log.error("ledger flush at shutdown failed, %d records not written: %s", len(ledger.pending), exc)
