"""`crosslogic policy`: edits validated before they are written."""

from __future__ import annotations

import subprocess
import sys

import asyncpg

from crosslogic.store import tenancy as t


def _policy(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {"CROSSLOGIC_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "crosslogic", "policy", *args], capture_output=True, text=True,
                          timeout=60, env=env)


async def test_policy_cli_writes_a_valid_edit_and_refuses_a_bad_one_with_the_reason(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await t.add_region(conn, "eu-central", "Frankfurt", [])
        ok = _policy(database_url, "set", "eu-central", "--pinning", "strict", "--spill-share", "0.2")
        assert ok.returncode == 0, ok.stderr
        row = await conn.fetchrow("SELECT pinning, spill_share, retries FROM routing_policy "
                                  "WHERE region = 'eu-central'")
        assert tuple(row) == ("strict", 0.2, 2)  # unset fields come from the '*' default

        bad = _policy(database_url, "set", "eu-central", "--score-weights", '{"latency": 1}')
        assert bad.returncode == 2
        assert "unknown scorers latency" in bad.stderr and "nothing written" in bad.stderr
        assert await conn.fetchval("SELECT score_weights FROM routing_policy WHERE region = 'eu-central'") == (
            '{"queue": 0.5, "kv_cache": 0.3, "throughput": 0.2}')
        assert _policy(database_url, "set", "mars", "--retries", "1").returncode == 2

        shown = _policy(database_url, "show")
        assert '"region": "eu-central"' in shown.stdout and '"pinning": "strict"' in shown.stdout
        assert _policy(database_url, "reset", "eu-central").returncode == 0
        assert await conn.fetchval("SELECT count(*) FROM routing_policy") == 1
    finally:
        await conn.close()
