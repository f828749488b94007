"""Billing and accounting metrics (seed §39), exposed by the accounting service's /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

billed_tokens = Counter("billing_tokens_total", "Tokens exported to Stripe", ["model"])
billed_cost = Counter("billing_cost_total", "Micro-dollars exported to Stripe (after free tier / plan)", ["model"])
records_pushed = Counter("billing_records_pushed_total", "Meter events Stripe accepted")
records_failed = Counter("billing_records_failed_total", "Meter event sends that failed (retried later)")
ledger_rows = Counter("ledger_rows_written_total", "Usage rows inserted into the ledger", ["path"])
unpriced_rows = Gauge("ledger_unpriced_rows",
                      "Usage rows held out of the ledger: no price, region multiplier or org terms at their time")
backstop_replays = Counter("backstop_replayed_total",
                           "Usage rows the durable backstop wrote because the gRPC access log had missed them")
backstop_skipped = Counter("backstop_skipped_total",
                           "Usage-log lines the backstop skipped: the gRPC access log had already committed them")
ledger_lag = Gauge("ledger_backlog_bytes", "Bytes of Envoy's usage log not yet committed to the ledger")
unexported_rows = Gauge("billing_unexported_rows", "Ledger rows not yet exported to Stripe")
