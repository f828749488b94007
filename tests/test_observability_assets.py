"""The observability assets without a stack: dashboards are the generator's output, alert rules are valid rule
files, the PromQL reader reads what they use, and every metric the services define has the prefix and base
units (seed §47). tests/test_observability.py checks the names against a running stack."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.promql import selectors

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
RULES = ROOT / "deploy" / "prometheus" / "crosslogic-alerts.yaml"

# Prometheus's rule file format (docs: configuration/recording_rules, alerting_rules), as a JSON schema.
RULE_FILE_SCHEMA = {
    "type": "object", "required": ["groups"], "additionalProperties": False,
    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "rules"], "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"},
            "limit": {"type": "integer"},
            "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["alert", "expr"], "additionalProperties": False,
                "properties": {
                    "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                    "expr": {"type": "string", "minLength": 1},
                    "for": {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"},
                    "keep_firing_for": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"},
                               "required": ["severity"],
                               "properties": {"severity": {"enum": ["critical", "warning", "info"]}}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"},
                                    "required": ["summary"]},
                }}},
        }}}},
}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_dashboards", ROOT / "scripts" / "gen_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA.glob("*.json"))}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel or variable, PromQL) for every Prometheus query of every dashboard."""
    found = []
    for name, board in dashboards().items():
        for panel in board["panels"]:
            for target in panel["targets"]:
                if "expr" in target:
                    found.append((name, panel["title"], target["expr"]))
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                found.append((name, f"${variable['name']}", variable["query"]["query"]))
    return found


def dashboard_sql() -> list[tuple[str, str, str]]:
    return [(name, panel["title"], target["rawSql"]) for name, board in dashboards().items()
            for panel in board["panels"] for target in panel["targets"] if "rawSql" in target]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_committed_dashboards_are_the_generators_output():
    rendered = _generator().render()
    assert sorted(rendered) == sorted(p.name for p in GRAFANA.glob("*.json"))
    for name, text in rendered.items():
        assert (GRAFANA / name).read_text() == text, f"{name}: run `python scripts/gen_dashboards.py`"


def test_the_seeds_four_dashboards_with_panels_that_query_something():
    titles = {board["title"] for board in dashboards().values()}
    assert titles == {"CrossLogic / Region overview", "CrossLogic / Model performance",
                      "CrossLogic / Billing overview", "CrossLogic / Reliability"}
    for board in dashboards().values():
        assert len({b["uid"] for b in dashboards().values()}) == 4
        for panel in board["panels"]:
            assert panel["targets"], panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            uid = panel["datasource"]["uid"]
            assert uid in {f"${{{v['name']}}}" for v in board["templating"]["list"] if v["type"] == "datasource"}


def test_alert_rules_are_a_valid_rule_file_covering_the_issues_conditions():
    document = yaml.safe_load(RULES.read_text())
    jsonschema.validate(document, RULE_FILE_SCHEMA)
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    expressions = " ".join(rule["expr"] for rule in alert_rules())
    for needed in ("crosslogic_node_status_changes_total", "envoy_http_downstream_rq_xx",
                   "crosslogic_billing_meter_events_failed_total", "crosslogic_ledger_backlog_bytes",
                   'crosslogic_dependency_down{dependency="redis"}'):
        assert needed in expressions  # node churn, error rate, billing export failures, ledger lag, limiter


@pytest.mark.parametrize("expr", [rule["expr"] for rule in alert_rules()] + [q[2] for q in dashboard_queries()])
def test_every_query_reads_as_promql_with_at_least_one_metric(expr):
    assert selectors(expr), expr


def test_the_promql_reader_finds_selectors_not_functions_keywords_or_label_lists():
    expr = ('histogram_quantile(0.99, sum by (le, region) (rate(a_bucket{region=~"$region", x!="y"}'
            '[$__rate_interval]))) / on (region) group_left (model) max without (node) (b) > bool 0.5'
            ' and c offset 5m unless vector(1)')
    assert [(s.metric, s.labels) for s in selectors(expr)] == [("a_bucket", {"region", "x"}), ("b", set()),
                                                                ("c", set())]
    assert [s.metric for s in selectors("label_values(crosslogic_nodes, region)")] == ["crosslogic_nodes"]
    assert [s.metric for s in selectors('time() - max(d{s="a,b}c"}) * 3600 / 1e6')] == ["d"]
    with pytest.raises(ValueError):
        selectors('{__name__=~"crosslogic_.*"}')


_DEFINED_METRICS = """
import json, prometheus_client
import crosslogic.accounting.sink, crosslogic.api.service, crosslogic.extauthz.service
import crosslogic.ratelimit.service, crosslogic.xds.service, crosslogic.agent.runner
from crosslogic.fleet.metrics import FleetMetrics
from crosslogic.runtime.backoff import Backoff
from crosslogic.runtime.supervision import Supervisor

library = (prometheus_client.ProcessCollector, prometheus_client.PlatformCollector, prometheus_client.GCCollector)
names = {}
for registry in (prometheus_client.REGISTRY, FleetMetrics().registry, Supervisor(Backoff(0.1, 1, 1), 1).registry):
    for collector in list(registry._collector_to_names):
        if not isinstance(collector, library):
            names.update({f.name: f.type for f in collector.describe() or collector.collect()})
print(json.dumps(names))
"""


def _service_metric_names() -> dict[str, str]:
    """name -> type of every metric the control-plane services and the agent define (their modules imported in a
    fresh interpreter: this one's default registry also holds what other tests' libraries registered, e.g.
    SkyPilot's), the supervisor's and the fleet's own registries included; prometheus_client's process,
    platform and GC collectors are the library's, not ours."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _DEFINED_METRICS], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    return json.loads(done.stdout)


def test_every_service_metric_has_the_prefix_and_base_units():
    names = _service_metric_names()
    assert len(names) > 40
    for name, kind in names.items():
        assert name.startswith("crosslogic_"), name
        for unit in ("_ms", "_milliseconds", "_minutes", "_usd", "_dollars", "_cents", "_cost", "_kb", "_mb"):
            assert unit not in name, f"{name}: base units (seconds, bytes, micro-dollars)"
        if kind == "histogram":
            assert name.endswith(("_seconds", "_bytes", "_tokens")), f"{name}: a histogram says its unit"
        if "money" in name or "microdollars" in name:
            assert name.endswith(("_microdollars", "_microdollars_total")) or kind == "counter", name


def test_json_log_lines_carry_the_request_and_trace_ids_only_inside_the_request():
    import logging

    from crosslogic.logs import JsonLines, request_context

    formatter = JsonLines("authz")

    def line(message: str) -> dict:
        return json.loads(formatter.format(logging.LogRecord("crosslogic.extauthz", logging.WARNING, __file__, 1,
                                                             message, None, None)))

    outside = line("before")
    assert outside["service"] == "authz" and "request_id" not in outside and outside["time"].endswith("Z")
    with request_context("req-1", "4bf92f3577b34da6a3ce929d0e0e4736"):
        inside = line("during")
    assert (inside["request_id"], inside["trace_id"], inside["message"]) == (
        "req-1", "4bf92f3577b34da6a3ce929d0e0e4736", "during")
    assert "request_id" not in line("after")


def test_trace_ids_are_read_from_w3c_traceparent_only():
    from crosslogic.tracing import trace_id_of

    assert trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") == "4bf92f3577b34da6a3ce929d0e0e4736"
    for bad in ("", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-abc-def-01"):
        assert trace_id_of(bad) == ""
