"""Accounting and billing metrics (seed §39, §47), exposed by the accounting service's /metrics.

Names carry the `crosslogic_` prefix and base units: seconds, bytes, tokens, micro-dollars (`_microdollars`;
integer money, as in the ledger). Labels are bounded: region, model, endpoint and status class come from the
catalogue and the protocol, never org, env or key ids (per-org usage is read from the ledger: the billing
dashboard's SQL panels).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from crosslogic.usage_record import UsageRecord

_POOL = ("region", "model")
# Requests and tokens as Envoy reported them to the access-log sink (the fast path). A request the gRPC access
# log missed is counted by crosslogic_backstop_replayed_rows_total instead, when the backstop writes it.
requests = Counter("crosslogic_requests", "Finished requests routed to a node pool, by outcome class",
                   (*_POOL, "endpoint", "status_class"))
tokens = Counter("crosslogic_tokens", "Tokens of finished requests (prompt and completion) by pool",
                 (*_POOL, "kind"))
# LLM answers take from tens of milliseconds (an embedding) to minutes (a long completion).
request_seconds = Histogram("crosslogic_request_duration_seconds", "Duration of finished requests, first byte in "
                            "to last byte out, as Envoy measured it", (*_POOL, "streamed"),
                            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600))

exported_tokens = Counter("crosslogic_billing_exported_tokens", "Tokens in meter events Stripe accepted", ["model"])
exported_microdollars = Counter("crosslogic_billing_exported_microdollars", "Micro-dollars in meter events Stripe "
                                "accepted (after free tier / plan)", ["model"])
meter_events_sent = Counter("crosslogic_billing_meter_events_sent", "Meter events Stripe accepted")
meter_events_failed = Counter("crosslogic_billing_meter_events_failed", "Meter event sends that failed (retried "
                              "later with backoff)")
export_runs_failed = Counter("crosslogic_billing_export_runs_failed", "Billing runs that failed as a whole "
                             "(Postgres or Stripe unreachable)")
export_enabled = Gauge("crosslogic_billing_export_enabled", "1 when the accounting service exports to Stripe "
                       "(CROSSLOGIC_STRIPE_API_KEY set)")
last_export_success = Gauge("crosslogic_billing_last_export_success_timestamp_seconds", "Unix time of the last "
                            "billing run that finished without a failed send")
unbilled_rows = Gauge("crosslogic_billing_unbilled_rows", "Ledger rows Stripe has not accepted yet")
unbilled_microdollars = Gauge("crosslogic_billing_unbilled_microdollars", "Cost of the ledger rows Stripe has not "
                              "accepted yet")
oldest_unbilled_seconds = Gauge("crosslogic_billing_oldest_unbilled_age_seconds", "Age of the oldest ledger row "
                                "Stripe has not accepted yet (0 when none)")
exports_open = Gauge("crosslogic_billing_exports_open", "Meter-event exports not yet accepted, by status",
                     ["status"])

ledger_rows = Counter("crosslogic_ledger_rows_written", "Usage rows inserted into the ledger", ["path"])
ledger_pending = Gauge("crosslogic_ledger_pending_records", "Usage records received and not yet committed to the "
                       "ledger (held in memory while Postgres is away)")
unpriced_rows = Gauge("crosslogic_ledger_unpriced_rows",
                      "Usage rows held out of the ledger: no price, region multiplier or org terms at their time")
backstop_replays = Counter("crosslogic_backstop_replayed_rows",
                           "Usage rows the durable backstop wrote because the gRPC access log had missed them")
backstop_skipped = Counter("crosslogic_backstop_skipped_lines",
                           "Usage-log lines the backstop skipped: the gRPC access log had already committed them")
ledger_lag = Gauge("crosslogic_ledger_backlog_bytes", "Bytes of Envoy's usage log not yet committed to the ledger")

for path in ("als", "backstop", "held"):
    ledger_rows.labels(path)


def status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code <= 599 else "other"


# Bound children per (region, model, endpoint, status class, streamed): `labels()` takes a lock and builds a
# key on every call, ~2 us each; this is once per usage record. Bounded like the labels themselves.
_bound: dict[tuple[str, str, str, str, bool], tuple] = {}


def _children(record: UsageRecord) -> tuple:
    key = (record.region or "none", record.model or "none", record.endpoint or "other",
           status_class(record.status_code), record.streamed)
    found = _bound.get(key)
    if found is None:
        region, model, endpoint, status, streamed = key
        found = _bound[key] = (requests.labels(region, model, endpoint, status), tokens.labels(region, model, "prompt"),
                               tokens.labels(region, model, "completion"),
                               request_seconds.labels(region, model, "true" if streamed else "false"))
    return found


def record_finished(record: UsageRecord) -> None:
    finished, prompt, completion, seconds = _children(record)
    finished.inc()
    if record.prompt_tokens:
        prompt.inc(record.prompt_tokens)
    if record.completion_tokens:
        completion.inc(record.completion_tokens)
    seconds.observe(record.latency_ms / 1000)
