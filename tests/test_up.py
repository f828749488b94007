"""`crosslogic up` as an operator uses it: restart on the same state dir, clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from crosslogic.runtime.processes import free_port, port_open
from tests.conftest import repo_root


def _up(state: Path) -> tuple[subprocess.Popen, dict]:
    ready = state / "ready.json"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "crosslogic", "--state-dir", str(state), "up", "--demo",
                             "--port", str(free_port()), "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=repo_root())
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "crosslogic up did not become ready"
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


async def _org_names(database_url: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return {r["name"] for r in await conn.fetch("SELECT name FROM orgs")}
    finally:
        await conn.close()


async def test_second_up_on_the_same_state_dir_keeps_the_data_and_sigterm_stops_every_child(tmp_path):
    proc, first = _up(tmp_path)
    try:
        conn = await asyncpg.connect(first["database_url"])
        await conn.execute("INSERT INTO orgs (name) VALUES ('survives-restart')")
        await conn.close()
    finally:
        assert _stop(proc) == 0
    ports = [int(first["gateway_base"].rsplit(":", 1)[1]), *first["ports"].values(),
             int(first["database_url"].split(":")[-1].split("/")[0])]
    assert not any(port_open("127.0.0.1", p) for p in ports), "a child outlived SIGTERM"

    proc, second = _up(tmp_path)
    try:
        assert "survives-restart" in await _org_names(second["database_url"])
        assert second["org_id"] == first["org_id"]  # same demo tenant, fresh key shown once more
    finally:
        assert _stop(proc) == 0


def test_up_never_says_ready_when_its_last_listener_cannot_be_bound(tmp_path):
    """The supervisor's /metrics listener is bound last; when its port is taken, `up` must fail before the
    ready file exists (it used to write it first and then stop everything: a "ready" stack refusing every
    connection)."""
    import os
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        ready = tmp_path / "ready.json"
        proc = subprocess.run(
            [sys.executable, "-m", "crosslogic", "--state-dir", str(tmp_path / "state"), "up", "--demo", "--port",
             str(free_port()), "--ready-file", str(ready)], capture_output=True, text=True, timeout=180,
            cwd=repo_root(), env={**os.environ, "CROSSLOGIC_SUPERVISOR_METRICS_PORT": str(taken.getsockname()[1])})
    assert proc.returncode == 1 and "crosslogic up failed" in proc.stderr, proc.stderr[-2000:]
    assert not ready.exists()

