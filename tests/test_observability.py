"""Observability of a running stack (seed §47, docs/observability.md): every dashboard query and alert rule names
a metric the services or Envoy export, every service answers /healthz and /readyz (and grpc.health.v1), and the
dashboards' SQL panels run on the ledger."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import asyncpg
import grpc
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from crosslogic.commands import build_parser
from crosslogic.commands.observe import TARGETS, targets
from crosslogic.runtime.processes import free_port
from tests.cli_helpers import runner
from tests.gateway_helpers import client, ledger_row
from tests.promql import selectors
from tests.ratelimit_helpers import wait_for
from tests.scheduler_helpers import WAIT_S, Fleet
from tests.test_observability_assets import alert_rules, dashboard_queries, dashboard_sql

MESSAGES = [{"role": "user", "content": "Say hello"}]


def _ops_ports(stack: dict) -> dict[str, str]:
    """runtime.json port name -> the path serving Prometheus text there: what `crosslogic observe scrape-config`
    tells Prometheus to scrape (so the check below also checks that configuration)."""
    running = targets(stack)
    return {port_name: path for port_name, (job, path) in TARGETS.items() if job in running}


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
        return response.status, response.headers.get("content-type", ""), await response.text()


async def _traffic(stack: dict) -> None:
    """Some of everything: plain and streamed chat, an embedding, refusals (bad key, unknown model)."""
    api = client(stack)
    await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5)
    stream = await api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5, stream=True)
    async for _chunk in stream:
        pass
    await api.embeddings.create(model="bge-small", input="hello")
    with pytest.raises(openai.AuthenticationError):
        await client(stack, "clsk_live_" + "0" * 32).models.list()
    with pytest.raises(openai.NotFoundError):
        await api.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=5)


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="(?:\\.|[^"\\])*"')


def exported(texts: list[str]) -> dict[str, set[str]]:
    """Every series name the scrapes expose, as Prometheus stores it -> the label names seen on it.

    Read from the text itself (prometheus_client's parser renames an Envoy counter `x` to `x_total`, which
    Prometheus never does). A family declared with no sample yet (a labelled counter nobody incremented) counts
    under the names its samples will have: `_total` for a counter, `_bucket`/`_sum`/`_count` for a histogram.
    """
    names: dict[str, set[str]] = {}
    for text in texts:
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                if kind == "counter" and not name.endswith("_total"):
                    names.setdefault(name + "_total", set())
                elif kind == "histogram":
                    for suffix in ("_bucket", "_sum", "_count"):
                        names.setdefault(name + suffix, set())
                else:
                    names.setdefault(name, set())
            elif line and not line.startswith("#"):
                found = _SAMPLE.match(line)
                assert found, line
                names.setdefault(found.group(1), set()).update(_LABEL.findall(found.group(2) or ""))
    return names


async def _scrape_all(stack: dict) -> dict[str, str]:
    texts = {}
    for port_name, path in _ops_ports(stack).items():
        status, _, text = await _get(f"http://127.0.0.1:{stack['ports'][port_name]}{path}")
        assert status == 200, port_name
        texts[port_name] = text
    return texts


async def test_every_dashboard_query_and_alert_rule_names_a_metric_the_running_stack_exports(gateway):
    await _traffic(gateway)

    async def accounted() -> dict[str, str] | None:  # the access log reached the accounting service
        texts = await _scrape_all(gateway)
        seen = [s for f in text_string_to_metric_families(texts["accounting_metrics"]) for s in f.samples
                if s.name == "crosslogic_requests_total" and s.labels["model"] == "bge-small"]
        return texts if seen else None

    texts = await wait_for(accounted, "the embedding counted by the accounting service")
    names = exported(list(texts.values()))
    queries = [(f"{board}: {where}", expr) for board, where, expr in dashboard_queries()]
    queries += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    checked = set()
    for where, expr in queries:
        for selector in selectors(expr):
            assert selector.metric in names, f"{where}: {selector.metric} is not exported by any service or Envoy"
            labels = names[selector.metric]
            if labels:  # with samples: the matchers name labels the series have
                assert selector.labels <= labels, f"{where}: {selector.metric} has no label {selector.labels - labels}"
            checked.add(selector.metric)
    assert len(checked) >= 40  # the reader found the selectors (49 when written)
    # The per-pool counters, with the traffic above in them.
    for family in text_string_to_metric_families(texts["accounting_metrics"]):
        if family.name == "crosslogic_tokens":
            kinds = {(s.labels["region"], s.labels["model"], s.labels["kind"]) for s in family.samples}
            assert {("ap-south", "llama-3-8b", "prompt"), ("ap-south", "llama-3-8b", "completion")} <= kinds


async def test_every_exported_control_plane_metric_has_the_prefix(gateway):
    texts = await _scrape_all(gateway)
    for port_name, text in texts.items():
        if port_name == "envoy_stats":
            assert all(f.name.startswith("envoy_") for f in text_string_to_metric_families(text))
            continue
        for family in text_string_to_metric_families(text):
            assert family.name.startswith(("crosslogic_", "process_", "python_")), (port_name, family.name)


async def test_every_service_answers_healthz_and_readyz_from_its_real_dependencies(gateway):
    expected = {"authz_metrics": {"postgres", "valkey"}, "accounting_metrics": {"postgres", "valkey"},
                "api_metrics": {"postgres"}, "xds_metrics": {"postgres", "snapshot"}, "fleet": {"postgres"},
                "ratelimit_metrics": {"postgres", "valkey"}}
    for port_name in _ops_ports(gateway):
        if port_name == "envoy_stats":
            continue
        base = f"http://127.0.0.1:{gateway['ports'][port_name]}"
        status, content_type, body = await _get(base + "/healthz")
        assert (status, content_type.split(";")[0]) == (200, "application/json"), port_name
        status, content_type, body = await _get(base + "/readyz")
        assert (status, content_type.split(";")[0]) == (200, "application/json"), (port_name, body)
        checks = json.loads(body)["checks"]
        if port_name == "supervisor_metrics":
            assert {"postgres", "valkey", "envoy", "authz", "accounting", "xds"} <= set(checks)
        else:
            assert set(checks) == expected[port_name], port_name
        assert all(c["ok"] for c in checks.values()), (port_name, checks)
    xds = json.loads((await _get(f"http://127.0.0.1:{gateway['ports']['xds_metrics']}/readyz"))[2])
    assert re.match(r"built; [1-9]\d* Envoy ADS stream", xds["checks"]["snapshot"]["detail"])


async def _health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                 timeout=5)
        return reply.status


async def test_grpc_services_answer_grpc_health_from_their_readiness(gateway):
    ports = gateway["ports"]
    services = {"xds": "envoy.service.discovery.v3.AggregatedDiscoveryService",
                "accounting": "envoy.service.accesslog.v3.AccessLogService"}
    if gateway["authz_transport"] == "grpc":
        services["authz"] = "envoy.service.auth.v3.Authorization"
    if gateway["admission"] == "rls":
        services["ratelimit"] = "envoy.service.ratelimit.v3.RateLimitService"
    for port_name, service in services.items():
        address = f"127.0.0.1:{ports[port_name]}"
        assert await _health(address) == health_pb2.HealthCheckResponse.SERVING, port_name
        assert await _health(address, service) == health_pb2.HealthCheckResponse.SERVING, port_name
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _health(address, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_envoy_stats_listener_serves_prometheus_and_nothing_else_of_the_admin(gateway):
    base = f"http://127.0.0.1:{gateway['ports']['envoy_stats']}"
    status, _, text = await _get(base + "/stats/prometheus")
    assert status == 200 and 'envoy_cluster_name="ap-south/llama-3-8b"' in text
    assert (await _get(base + "/ready"))[0] == 200
    for admin_only in ("/config_dump", "/clusters", "/logging", "/stats"):
        assert (await _get(base + admin_only))[0] == 404, admin_only


def _grafana_sql(query: str) -> str:
    """Grafana's Postgres macros as Grafana expands them ($__timeFilter(col): col BETWEEN the range's ends)."""
    return re.sub(r"\$__timeFilter\((\w+(?:\.\w+)?)\)", r"\1 BETWEEN now() - interval '6 hours' AND now()", query)


async def test_the_dashboards_sql_panels_run_on_the_ledger(gateway):
    raw = await client(gateway).chat.completions.with_raw_response.create(model="llama-3-8b", messages=MESSAGES,
                                                                          max_tokens=5)
    await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        for board, title, query in dashboard_sql():
            assert "$" not in _grafana_sql(query), (board, title)
            await asyncio.wait_for(conn.fetch(_grafana_sql(query)), 10)
        orgs = await conn.fetch(_grafana_sql(next(q for _, t, q in dashboard_sql() if t.startswith("Token usage"))))
        assert any(row["org"] == "demo" and row["tokens"] > 0 for row in orgs)
    finally:
        await conn.close()


def test_observe_health_and_scrape_config_read_the_running_stack(gateway, capsys):
    run = runner(build_parser(), capsys)
    health = run("observe", "health", "--state-dir", gateway["state_dir"], "--json")
    assert health.code == 0, health.out
    report = health.json()
    assert set(report) == set(targets(gateway)) - {"envoy"} and all(e["ready"] for e in report.values())
    config = run("observe", "scrape-config", "--state-dir", gateway["state_dir"])
    jobs = {job["job_name"]: job for job in yaml.safe_load(config.out)["scrape_configs"]}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["crosslogic-xds"]["static_configs"] == [{"targets": [f"127.0.0.1:{gateway['ports']['xds_metrics']}"]}]
    assert ("crosslogic-ratelimit" in jobs) == (gateway["admission"] == "rls")


async def test_an_agent_reports_its_readiness_and_the_control_plane_exports_its_nodes_load(gateway, tmp_path):
    fleet = Fleet(gateway, tmp_path)
    try:
        await fleet.setup({"r": []})
        port = free_port()
        node = fleet.start_node("observed", "r", agent_args=("--metrics-port", str(port)))
        agent = f"http://127.0.0.1:{port}"

        async def ready() -> dict | None:
            try:
                status, _, body = await _get(agent + "/readyz")
            except aiohttp.ClientError:
                return None
            return json.loads(body) if status == 200 else None

        checks = (await wait_for(ready, "the agent's /readyz", timeout_s=WAIT_S))["checks"]
        assert checks["control_plane"]["ok"] and checks["engine"] == {"ok": True, "detail": "/health 200"}
        text = (await _get(agent + "/metrics"))[2]
        assert "crosslogic_agent_registered 1.0" in text and "crosslogic_agent_engine_ready_seconds" in text
        xds = f"http://127.0.0.1:{gateway['ports']['xds_metrics']}/metrics"

        async def load_exported() -> bool:
            series = f'crosslogic_node_requests_running{{node="{node.name}",region="{node.region}"}}'
            return series in (await _get(xds))[2]

        await wait_for(load_exported, "the node's reported load on the xds /metrics", timeout_s=WAIT_S)

        node.sim.kill()  # the engine dies: the agent is alive but not ready
        node.sim.wait(10)

        async def not_ready() -> dict | None:
            status, _, body = await _get(agent + "/readyz")
            return json.loads(body) if status == 503 else None

        checks = (await wait_for(not_ready, "the agent's /readyz without its engine", timeout_s=WAIT_S))["checks"]
        assert not checks["engine"]["ok"] and (await _get(agent + "/healthz"))[0] == 200
    finally:
        fleet.stop()
