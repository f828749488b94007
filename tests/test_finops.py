"""FinOps: GPU cost per node hour -> cost per token and margin per model and region."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from crosslogic.accounting.finops import ModelUsage, NodeCost, finops_rows
from tests.conftest import repo_root


def test_node_cost_is_shared_by_its_models_and_margin_is_revenue_minus_gpu_cost():
    nodes = [NodeCost("ap-south", ("llama",), 2_000_000, 3600),  # $2/h for one hour
             NodeCost("ap-south", ("llama", "qwen"), 1_000_001, 3600)]
    usage = [ModelUsage("ap-south", "llama", 1_000_000, 3_000_000, 2_500_000)]
    rows = {r.model: r for r in finops_rows(nodes, usage)}
    assert rows["llama"].gpu_cost_microdollars == 2_000_000 + 500_001
    assert rows["qwen"].gpu_cost_microdollars == 500_000 and rows["qwen"].gpu_cost_per_1m_tokens_microdollars is None
    assert rows["llama"].margin_microdollars == 3_000_000 - 2_500_001
    assert rows["llama"].gpu_cost_per_1m_tokens_microdollars == 2_500_001


def _report(database_url: str, since: str) -> list[dict]:
    env = {**os.environ, "CROSSLOGIC_DATABASE_URL": database_url}
    out = subprocess.run([sys.executable, "-m", "crosslogic", "finops", "report", "--json", "--since", since],
                         env=env, cwd=repo_root(), capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


async def test_finops_report_reads_gpu_prices_nodes_and_the_ledger(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('ap-south', 'x')")
        await conn.execute("INSERT INTO models (model_id) VALUES ('llama')")
        await conn.execute("INSERT INTO gpu_prices VALUES ('L4', 'aws', true, 360000)")  # $0.36/h spot
        await conn.execute("INSERT INTO nodes (name, region, cloud, spot, gpu_type, model_list, endpoint_host, "
                           "endpoint_port, created_at) VALUES ('n1', 'ap-south', 'aws', true, 'L4', '{llama}', "
                           "'127.0.0.1', 9, now() - interval '2 hours')")
        await conn.execute(
            "INSERT INTO usage_records (request_id, occurred_at, org_id, env_id, key_id, region, model, endpoint, "
            "status_code, prompt_tokens, completion_tokens, total_tokens, usage_source, cost_microdollars) "
            "VALUES ('r', now(), $1, $1, $1, 'ap-south', 'llama', 'chat.completions', 200, 600, 400, 1000, "
            "'reported', 900000)", uuid.uuid4())
    finally:
        await conn.close()
    [row] = _report(database_url, (datetime.now(UTC) - timedelta(hours=1)).isoformat())
    assert (row["region"], row["model"], row["tokens"], row["revenue_microdollars"]) == ("ap-south", "llama", 1000,
                                                                                         900000)
    # One hour of the window at $0.36/h (give or take the seconds the test took).
    assert 359_000 <= row["gpu_cost_microdollars"] <= 361_000
    assert row["margin_microdollars"] == 900000 - row["gpu_cost_microdollars"]


async def test_an_evicted_spot_node_keeps_its_gpu_hours_after_the_registry_deleted_it(database_url):
    from crosslogic.xds import node_registry as registry

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('ap-south', 'x')")
        await conn.execute("INSERT INTO models (model_id) VALUES ('llama')")
        await conn.execute("INSERT INTO gpu_prices VALUES ('L4', 'aws', true, 360000)")  # $0.36/h spot
        spot = registry.Registration(name="spot-1", region="ap-south", cloud="aws", spot=True, gpu_type="L4",
                                     vram_total_gb=24, vram_free_gb=20, throughput_tokens_per_sec=1000,
                                     models=("llama",), endpoint_host="127.0.0.1", endpoint_port=9)
        node_id = await registry.register(conn, spot, None)
        # It ran for three hours before its spot notice (time passes: its lifetime began then).
        await conn.execute("UPDATE node_lifetimes SET started_at = now() - interval '3 hours' WHERE node_id = $1",
                           uuid.UUID(node_id))
        await registry.drain(conn, node_id, "spot eviction (aws)")
        await registry.shut_down(conn, node_id, "evicted")
        await registry.sweep(conn, registry.Lifetimes(remove_after_s=0))  # dead rows are deleted after a while
        assert await conn.fetchval("SELECT count(*) FROM nodes") == 0
        lifetime = await conn.fetchrow("SELECT ended_at, ended_by FROM node_lifetimes WHERE node_id = $1",
                                       uuid.UUID(node_id))
        assert lifetime["ended_at"] is not None and lifetime["ended_by"] == "evicted"
        # Registered again under the same name later: a second lifetime, from now on.
        await registry.register(conn, spot, None)
        assert await conn.fetchval("SELECT count(*) FROM node_lifetimes WHERE ended_at IS NULL") == 1
    finally:
        await conn.close()
    [row] = _report(database_url, (datetime.now(UTC) - timedelta(hours=2)).isoformat())
    # Two of its three hours fall in the window (give or take the seconds the test took), plus the new one's seconds.
    assert 2 * 360_000 - 1_000 <= row["gpu_cost_microdollars"] <= 2 * 360_000 + 1_000
    assert row["tokens"] == 0 and row["margin_microdollars"] == -row["gpu_cost_microdollars"]


async def test_a_node_that_changed_what_it_serves_costs_each_model_for_its_own_span(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('ap-south', 'x')")
        await conn.execute("INSERT INTO models (model_id) VALUES ('llama'), ('qwen')")
        await conn.execute("INSERT INTO gpu_prices VALUES ('A100', 'onprem', false, 1000000)")  # $1/h
        node = await conn.fetchval("INSERT INTO nodes (name, region, gpu_type, model_list, endpoint_host, "
                                   "endpoint_port) VALUES ('n', 'ap-south', 'A100', '{llama}', '127.0.0.1', 9) "
                                   "RETURNING node_id")
        await conn.execute("UPDATE node_lifetimes SET started_at = now() - interval '2 hours'")
        await conn.execute("UPDATE nodes SET model_list = '{qwen}' WHERE node_id = $1", node)
        await conn.execute("UPDATE node_lifetimes SET ended_at = now() - interval '1 hour' WHERE ended_at IS NOT NULL")
        await conn.execute("UPDATE node_lifetimes SET started_at = now() - interval '1 hour' WHERE ended_at IS NULL")
    finally:
        await conn.close()
    rows = {r["model"]: r["gpu_cost_microdollars"]
            for r in _report(database_url, (datetime.now(UTC) - timedelta(hours=3)).isoformat())}
    assert abs(rows["llama"] - 1_000_000) <= 1_000 and abs(rows["qwen"] - 1_000_000) <= 1_000
