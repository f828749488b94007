"""Writes the Grafana dashboards (seed §47.2) to deploy/grafana/*.json.

The panels are listed here, compactly, and rendered into Grafana's dashboard JSON (schema 39, Grafana 10/11):
`python scripts/gen_dashboards.py`, then commit both. tests/test_observability_assets.py checks that the JSON is
this script's output, and tests/test_observability.py that every query names a metric a running stack exports.

Two data sources, chosen when the dashboard is imported: `datasource` (Prometheus: the services' /metrics and
Envoy's /stats/prometheus) and `ledger` (PostgreSQL, a read-only role on the control plane's database). What is
per org comes from the ledger, never from a metric label: orgs are unbounded, the ledger already has them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
PROM = {"type": "prometheus", "uid": "${datasource}"}
LEDGER = {"type": "grafana-postgresql-datasource", "uid": "${ledger}"}
RATE = "$__rate_interval"
GATEWAY = 'envoy_http_conn_manager_prefix="gateway"'


def prom(title: str, *exprs: tuple[str, str], unit: str = "short", kind: str = "timeseries", w: int = 12,
         description: str = "") -> dict:
    return {"type": kind, "title": title, "description": description, "datasource": PROM, "w": w,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"datasource": PROM, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                        for i, (expr, legend) in enumerate(exprs)]}


def sql(title: str, query: str, unit: str = "short", kind: str = "table", w: int = 12, description: str = "") -> dict:
    return {"type": kind, "title": title, "description": description, "datasource": LEDGER, "w": w,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"datasource": LEDGER, "rawSql": " ".join(query.split()), "format": "table",
                         "rawQuery": True, "editorMode": "code", "refId": "A"}]}


def variable(name: str, query: str, label: str) -> dict:
    return {"type": "query", "name": name, "label": label, "datasource": PROM,
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}}


def datasources(with_ledger: bool) -> list[dict]:
    found = [{"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus"}]
    if with_ledger:
        found.append({"type": "datasource", "name": "ledger", "label": "Ledger (PostgreSQL)",
                      "query": "grafana-postgresql-datasource"})
    return found


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables: list[dict]) -> dict:
    laid, x, y, row_h = [], 0, 0, 8
    for number, panel in enumerate(panels, start=1):
        w = panel.pop("w")
        if x + w > 24:
            x, y = 0, y + row_h
        laid.append({"id": number, "gridPos": {"x": x, "y": y, "w": w, "h": row_h}, **panel})
        x += w
    return {"uid": uid, "title": title, "description": description, "tags": ["crosslogic"], "editable": True,
            "schemaVersion": 39, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
            "templating": {"list": datasources(any(p["datasource"] == LEDGER for p in panels)) + variables},
            "panels": laid}


R = 'region=~"$region"'
M = 'model=~"$model"'


def region_overview() -> dict:
    return dashboard("crosslogic-region-overview", "CrossLogic / Region overview",
                     "Node count, active capacity and latency per region (seed §47.2 #1)", [
        prom("Nodes by status", (f"sum by (region, status) (max by (region, model, status) (crosslogic_nodes{{{R}}}))",
                                 "{{region}} {{status}}"),
             description="Registered nodes per region (a node serving two models counts once per model)"),
        prom("Healthy endpoints per pool (own region)",
             (f'max by (region, model) (crosslogic_pool_endpoints{{{R}, health="healthy"}})', "{{region}}/{{model}}"),
             (f'max by (region, model) (crosslogic_pool_endpoints{{{R}, health=~"unhealthy|degraded"}})',
              "{{region}}/{{model}} unhealthy or degraded")),
        prom("Active capacity (tokens/s)",
             (f"max by (region, model) (crosslogic_pool_capacity_tokens_per_second{{{R}}})",
              "{{region}}/{{model}} expected"),
             (f"sum by (region) (max by (node, region) (crosslogic_node_generation_tokens_per_second{{{R}}}))",
              "{{region}} measured decode"), unit="short"),
        prom("Requests/s by region", (f"sum by (region) (rate(crosslogic_requests_total{{{R}}}[{RATE}]))",
                                      "{{region}}"), unit="reqps"),
        prom("Latency p50 / p95 / p99 by region",
             *[(f"histogram_quantile({q}, sum by (le, region) "
                f"(rate(crosslogic_request_duration_seconds_bucket{{{R}}}[{RATE}])))", f"{{{{region}}}} p{p}")
               for q, p in ((0.5, "50"), (0.95, "95"), (0.99, "99"))], unit="s"),
        prom("Latency distribution", (f"sum by (le) (increase(crosslogic_request_duration_seconds_bucket{{{R}}}"
                                      f"[{RATE}]))", "{{le}}"), kind="heatmap", unit="s"),
        prom("Gateway requests/s by pool (Envoy)",
             (f"sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total"
              f"{{envoy_cluster_name=~\"($region)/.*\"}}[{RATE}]))", "{{envoy_cluster_name}}"), unit="reqps"),
        prom("Engine queue by node", (f"max by (node) (crosslogic_node_requests_waiting{{{R}}})", "{{node}} waiting"),
             (f"max by (node) (crosslogic_node_requests_running{{{R}}})", "{{node}} running")),
    ], [variable("region", "label_values(crosslogic_nodes, region)", "Region")])


def model_performance() -> dict:
    return dashboard("crosslogic-model-performance", "CrossLogic / Model performance",
                     "Tokens per second per model, cost per region, GPU use (seed §47.2 #2)", [
        prom("Completion tokens/s per model",
             (f'sum by (model) (rate(crosslogic_tokens_total{{{M}, {R}, kind="completion"}}[{RATE}]))', "{{model}}")),
        prom("Prompt tokens/s per model",
             (f'sum by (model) (rate(crosslogic_tokens_total{{{M}, {R}, kind="prompt"}}[{RATE}]))', "{{model}}")),
        prom("Requests/s per model and endpoint",
             (f"sum by (model, endpoint) (rate(crosslogic_requests_total{{{M}, {R}}}[{RATE}]))",
              "{{model}} {{endpoint}}"), unit="reqps"),
        prom("Latency p95 per model",
             (f"histogram_quantile(0.95, sum by (le, model, streamed) "
              f"(rate(crosslogic_request_duration_seconds_bucket{{{M}, {R}}}[{RATE}])))",
              "{{model}} streamed={{streamed}}"),
             unit="s"),
        prom("KV-cache use by node (GPU memory)", (f"max by (node) (crosslogic_node_kv_cache_usage_ratio{{{R}}})",
                                                   "{{node}}"), unit="percentunit"),
        prom("Time to first token by node", (f"max by (node) (crosslogic_node_ttft_seconds{{{R}}})", "{{node}}"),
             unit="s"),
        sql("Revenue per region (ledger, USD)",
            "SELECT region, round(sum(cost_microdollars) / 1e6, 6) AS usd, sum(total_tokens) AS tokens "
            "FROM usage_records WHERE $__timeFilter(occurred_at) GROUP BY region ORDER BY usd DESC",
            description="What the ledger priced in the time range, per region (before free tiers)"),
        sql("Revenue per model (ledger, USD)",
            "SELECT model, round(sum(cost_microdollars) / 1e6, 6) AS usd, sum(total_tokens) AS tokens "
            "FROM usage_records WHERE $__timeFilter(occurred_at) GROUP BY model ORDER BY usd DESC"),
    ], [variable("model", "label_values(crosslogic_tokens_total, model)", "Model"),
        variable("region", "label_values(crosslogic_tokens_total, region)", "Region")])


def billing_overview() -> dict:
    return dashboard("crosslogic-billing-overview", "CrossLogic / Billing overview",
                     "Token usage per org, billed vs unbilled, Stripe export health, the ledger (seed §47.2 #3)", [
        sql("Token usage per org (top 20)",
            "SELECT o.name AS org, sum(u.total_tokens) AS tokens, round(sum(u.cost_microdollars) / 1e6, 6) AS usd "
            "FROM usage_records u JOIN orgs o ON o.org_id = u.org_id WHERE $__timeFilter(u.occurred_at) "
            "GROUP BY o.name ORDER BY tokens DESC LIMIT 20"),
        sql("Billed vs unbilled (ledger)",
            "SELECT CASE WHEN billed THEN 'billed' WHEN billing_failed THEN 'export failing' "
            "WHEN export_id IS NOT NULL THEN 'exported, not confirmed' ELSE 'not exported yet' END AS state, "
            "count(*) AS rows, round(sum(cost_microdollars) / 1e6, 6) AS usd FROM usage_records "
            "WHERE $__timeFilter(occurred_at) GROUP BY 1 ORDER BY 1"),
        prom("Exported to Stripe (USD/h)",
             (f"sum by (model) (rate(crosslogic_billing_exported_microdollars_total[{RATE}])) * 3600 / 1e6",
              "{{model}}"), unit="currencyUSD"),
        prom("Not yet accepted by Stripe",
             ("max(crosslogic_billing_unbilled_microdollars) / 1e6", "unbilled USD"),
             ("max(crosslogic_billing_unbilled_rows)", "unbilled rows")),
        prom("Stripe meter events",
             (f"sum(rate(crosslogic_billing_meter_events_sent_total[{RATE}]))", "accepted/s"),
             (f"sum(rate(crosslogic_billing_meter_events_failed_total[{RATE}]))", "failed/s"),
             (f"sum(rate(crosslogic_billing_export_runs_failed_total[{RATE}]))", "failed runs/s")),
        prom("Stripe export freshness",
             ("time() - max(crosslogic_billing_last_export_success_timestamp_seconds)", "since last good run"),
             ("max(crosslogic_billing_oldest_unbilled_age_seconds)", "oldest unbilled row"), unit="s"),
        prom("Open exports by status", ("max by (status) (crosslogic_billing_exports_open)", "{{status}}")),
        prom("Ledger rows written/s by path",
             (f"sum by (path) (rate(crosslogic_ledger_rows_written_total[{RATE}]))", "{{path}}"),
             (f"sum(rate(crosslogic_backstop_replayed_rows_total[{RATE}]))", "replayed by the backstop")),
        prom("Ledger lag", ("max(crosslogic_ledger_backlog_bytes)", "usage log not committed (bytes)"),
             ("max(crosslogic_ledger_pending_records)", "records in memory"),
             ("max(crosslogic_ledger_unpriced_rows)", "rows held: no price")),
        prom("Bill caps", ("sum by (threshold_pct) (increase(crosslogic_billing_cap_alerts_total[1h]))",
                           "alerts at {{threshold_pct}}%"),
             ("sum(increase(crosslogic_billing_cap_suspensions_total[1h]))", "suspensions"),
             (f"sum by (outcome) (rate(crosslogic_billcap_decisions_total[{RATE}]))", "cap check {{outcome}}")),
    ], [])


def reliability() -> dict:
    return dashboard("crosslogic-reliability", "CrossLogic / Reliability",
                     "Error rate, failovers, node churn, degraded dependencies (seed §47.2 #4)", [
        prom("Gateway error rate (5xx share)",
             (f'sum(rate(envoy_http_downstream_rq_xx{{{GATEWAY}, envoy_response_code_class="5"}}[{RATE}])) / '
              f"sum(rate(envoy_http_downstream_rq_total{{{GATEWAY}}}[{RATE}]))", "5xx"),
             (f'sum(rate(envoy_http_downstream_rq_xx{{{GATEWAY}, envoy_response_code_class="4"}}[{RATE}])) / '
              f"sum(rate(envoy_http_downstream_rq_total{{{GATEWAY}}}[{RATE}]))", "4xx"), unit="percentunit"),
        prom("Errors per pool (5xx share)",
             (f'sum by (region, model) (rate(crosslogic_requests_total{{status_class="5xx"}}[{RATE}])) / '
              f"sum by (region, model) (rate(crosslogic_requests_total[{RATE}]))", "{{region}}/{{model}}"),
             unit="percentunit"),
        prom("Refused by ext_authz", (f'sum by (status, code) (rate(crosslogic_authz_checks_total{{outcome="refused"}}'
                                      f"[{RATE}]))", "{{status}} {{code}}"), unit="reqps"),
        prom("Rate limiting", (f'sum by (layer, kind) (rate(crosslogic_ratelimit_decisions_total{{outcome="refused"}}'
                               f"[{RATE}]))", "refused {{layer}} {{kind}}"),
             (f"sum by (outcome, reason) (rate(crosslogic_ratelimit_degraded_decisions_total[{RATE}]))",
              "degraded {{outcome}} ({{reason}})"), unit="reqps"),
        prom("Failovers: retries to another node (Envoy)",
             (f"sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_retry[{RATE}]))", "{{envoy_cluster_name}}"),
             (f"sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_cx_connect_fail[{RATE}]))",
              "{{envoy_cluster_name}} connect failures"), unit="reqps"),
        prom("Node churn", ("sum by (region, change) (increase(crosslogic_node_status_changes_total[15m]))",
                            "{{region}} {{change}}")),
        prom("Dependencies down (degraded mode)", ("max by (job, dependency) (crosslogic_dependency_down)",
                                                    "{{job}} without {{dependency}}"),
             ("max(crosslogic_degraded)", "stack degraded (supervisor)")),
        prom("Restarts of supervised children", ("sum by (child) (increase(crosslogic_child_restarts_total[1h]))",
                                                 "{{child}}")),
        prom("Control plane: xDS", ("sum(crosslogic_xds_streams)", "Envoy ADS streams"),
             (f"sum(rate(crosslogic_xds_nacks_total[{RATE}]))", "NACKs/s"),
             ("max(crosslogic_routing_policy_rejected)", "routing policy rejected"),
             ("max(envoy_control_plane_connected_state)", "Envoy connected to xDS")),
        prom("Scheduler rebuild p99", (f"histogram_quantile(0.99, sum by (le) "
                                       f"(rate(crosslogic_xds_rebuild_duration_seconds_bucket[{RATE}])))", "p99"),
             unit="s"),
        prom("ext_authz check p99", (f"histogram_quantile(0.99, sum by (le) "
                                     f"(rate(crosslogic_authz_check_duration_seconds_bucket[{RATE}])))", "p99"),
             (f"sum(rate(envoy_http_ext_authz_error[{RATE}]))", "Envoy: ext_authz errors/s"), unit="s"),
        prom("Fleet launches failing", (f"sum by (region, model, kind) (rate(crosslogic_fleet_launch_failures_total"
                                        f"[{RATE}]))", "{{region}}/{{model}} {{kind}}"), unit="reqps"),
    ], [])


DASHBOARDS = {"region-overview.json": region_overview, "model-performance.json": model_performance,
              "billing-overview.json": billing_overview, "reliability.json": reliability}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
