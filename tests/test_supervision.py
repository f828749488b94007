"""Supervision: `crosslogic up` brings every child back, and nothing is lost while it does.

The state machine runs here on real processes with a test clock (delays are checked, not waited for). The
proof runs its own `crosslogic up --demo` under steady traffic, SIGKILLs Valkey, Postgres, Envoy, every
service and a demo node one at a time, and sees each part serve again within 10 s; at the end every request
that got a 200 has exactly one ledger row, with the usage the client saw.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from crosslogic.logs import RepeatThrottle
from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.gate import AdmissionGate
from crosslogic.ratelimit.store import LimitStore
from crosslogic.runtime.backoff import Backoff
from crosslogic.runtime.processes import ChildProcess
from crosslogic.runtime.supervision import BACKOFF, READY, STARTING, Supervised, Supervisor
from crosslogic.runtime.valkey import EmbeddedValkey
from crosslogic.store import tenancy
from crosslogic.store.db import open_pool
from tests.conftest import repo_root, up_demo

RECOVERY_S = 10.0


# ------------------------------------------------------------------ the state machine, on real processes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _child(tmp_path: Path, code: str, name: str = "child") -> ChildProcess:
    return ChildProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def _supervised(child: ChildProcess, ready=lambda: True) -> Supervised:
    child.start()
    return Supervised(child.name, lambda: child, child.start, ready)


def _settle(child: ChildProcess) -> None:
    """Lets the real process reach the state the test is about (exited), so the poll sees it."""
    assert child.proc is not None
    child.proc.wait(30)


def test_a_crash_loop_backs_off_to_the_maximum_instead_of_restarting_every_second(tmp_path):
    clock = Clock()
    backoff = Backoff(initial_s=0.2, maximum_s=30.0, healthy_after_s=30.0)
    supervisor = Supervisor(backoff, ready_timeout_s=60, clock=clock)
    child = _child(tmp_path, "import sys; sys.exit(3)")
    entry = _supervised(child, ready=lambda: False)
    supervisor.add(entry)
    delays = []
    started = clock.now
    while clock.now - started < 3600:  # one simulated hour of a child that always crashes
        _settle(child)
        supervisor.poll()
        assert entry.state == BACKOFF and entry.last_exit == 3
        delays.append(entry.next_start - clock.now)
        clock.now = entry.next_start
        supervisor.poll()
        assert entry.state == STARTING
    assert delays[:9] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0])
    assert all(d == pytest.approx(30.0) for d in delays[9:])
    assert len(delays) < 3600 / 30 + 10, "restarts must thin out to one per maximum delay"
    assert supervisor.status()["degraded"] is True


def test_a_healthy_run_resets_the_backoff_and_readiness_is_checked_after_every_restart(tmp_path):
    clock = Clock()
    supervisor = Supervisor(Backoff(initial_s=0.5, maximum_s=60.0, healthy_after_s=30.0), ready_timeout_s=60,
                            clock=clock)
    ready = {"now": True}
    child = _child(tmp_path, "import time; time.sleep(600)")
    entry = _supervised(child, ready=lambda: ready["now"])
    supervisor.add(entry)
    try:
        for crash, delay in enumerate([0.5, 1.0, 2.0], start=1):  # crashes soon after each restart
            child.kill()
            supervisor.poll()
            assert (entry.state, entry.failures, entry.next_start - clock.now) == (BACKOFF, crash, delay)
            clock.now = entry.next_start
            ready["now"] = False
            supervisor.poll()  # restarted; not ready yet
            supervisor.poll()
            assert entry.state == STARTING and child.running
            ready["now"] = True
            clock.now += 1
            supervisor.poll()
            assert entry.state == READY
        clock.now += 30  # ready for healthy_after_s: recovered
        supervisor.poll()
        child.kill()
        supervisor.poll()
        assert (entry.failures, entry.next_start - clock.now) == (1, 0.5)
        assert entry.restarts == 3 and supervisor.status()["children"]["child"]["restarts"] == 3
    finally:
        child.kill()


def test_a_restart_that_never_becomes_ready_is_killed_and_counted_as_a_crash(tmp_path):
    clock = Clock()
    registry_sample = None
    supervisor = Supervisor(Backoff(initial_s=1.0, maximum_s=8.0), ready_timeout_s=20, clock=clock)
    child = _child(tmp_path, "import time; time.sleep(600)")
    entry = _supervised(child, ready=lambda: entry.restarts == 0)  # the first start was fine, restarts hang
    supervisor.add(entry)
    try:
        child.kill()
        supervisor.poll()
        clock.now = entry.next_start
        supervisor.poll()
        assert entry.state == STARTING and child.running
        clock.now += 21
        supervisor.poll()
        assert entry.state == BACKOFF and not child.running and entry.failures == 2
        registry_sample = supervisor.registry.get_sample_value("crosslogic_child_ready", {"child": "child"})
        assert registry_sample == 0
        assert supervisor.registry.get_sample_value("crosslogic_degraded") == 1
        assert supervisor.registry.get_sample_value("crosslogic_child_restarts_total", {"child": "child"}) == 1
    finally:
        child.kill()


def test_a_dead_childs_leftover_processes_are_killed_before_the_restart(tmp_path):
    """Like a SIGKILLed postmaster's backends: they hold its shared memory, the new one could not start."""
    marker = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(600)']); open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    clock = Clock()
    supervisor = Supervisor(Backoff(initial_s=1.0), ready_timeout_s=60, clock=clock)
    child = _child(tmp_path, code)
    supervisor.add(_supervised(child))
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(marker.read_text())
    assert child.proc is not None
    os.kill(child.proc.pid, signal.SIGKILL)  # only the child: its own child stays, as a postmaster's would
    _settle(child)
    supervisor.poll()
    for _ in range(100):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        try:
            os.waitpid(grandchild, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    else:
        pytest.fail("the dead child's own child is still running")


# ------------------------------------------------------------------ a service's degraded mode


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_limiter_reports_degraded_mode_logs_it_once_and_recovers_when_valkey_returns(
        database_url, tmp_path, caplog):
    conn = await asyncpg.connect(database_url)
    try:
        org = await tenancy.create_org(conn, "acme")
        env = await tenancy.create_env(conn, org.org_id, "prod")
        key, _ = await tenancy.create_key(conn, b"secret", org.org_id, env.env_id)
    finally:
        await conn.close()
    ids = (str(org.org_id), str(env.env_id), str(key.key_id))
    valkey = EmbeddedValkey(tmp_path / "valkey").start()
    throttle = RepeatThrottle(interval_s=3600)
    caplog.handler.addFilter(throttle)  # what every crosslogic process's log handler does
    redis = aioredis.from_url(valkey.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        async with open_pool(database_url) as pool:
            gate = AdmissionGate(Limiter(redis), LimitStore(pool))
            assert not (await gate.decide(*ids, "ap-south", uuid.uuid4().hex, 10)).degraded
            degraded = _sample("crosslogic_ratelimit_degraded_decisions_total", outcome="admitted",
                               reason="redis_unavailable")
            assert valkey.child is not None
            valkey.child.kill()
            with caplog.at_level(logging.WARNING):
                for _ in range(25):
                    assert (await gate.decide(*ids, "ap-south", uuid.uuid4().hex, 10)).degraded  # fail-open
                assert _sample("crosslogic_dependency_down", dependency="redis") == 1
                valkey.start()  # the same port and data, as the supervisor restarts it
                decision = await gate.decide(*ids, "ap-south", uuid.uuid4().hex, 10)
            assert decision.admitted and not decision.degraded, "the Redis client did not reconnect"
            assert _sample("crosslogic_dependency_down", dependency="redis") == 0
            assert _sample("crosslogic_ratelimit_degraded_decisions_total", outcome="admitted",
                           reason="redis_unavailable") == degraded + 25
    finally:
        caplog.handler.removeFilter(throttle)
        await redis.aclose()
        valkey.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("admitting (fail-open)" in line for line in lines) == 1, lines  # not one per request
    assert sum("redis unavailable" in line and "running degraded" in line for line in lines) == 1
    assert any(line.startswith("redis is back after") and "(25 calls failed meanwhile)" in line for line in lines)


def test_the_throttle_counts_what_it_left_out_and_keeps_different_subjects_apart():
    clock = Clock()
    throttle = RepeatThrottle(10.0, clock=clock)

    def record(msg: str, *args) -> logging.LogRecord:
        return logging.LogRecord("crosslogic.x", logging.WARNING, __file__, 1, msg, args, None)

    assert throttle.filter(record("redis unavailable (%s): admitting", OSError("refused")))
    assert not any(throttle.filter(record("redis unavailable (%s): admitting", OSError(f"e{i}")))
                   for i in range(41))
    assert throttle.filter(record("%s exited with code %s", "valkey", -9))
    assert throttle.filter(record("%s exited with code %s", "postgres", -9)), "another child is news"
    clock.now += 10
    passed = record("redis unavailable (%s): admitting", OSError("refused"))
    assert throttle.filter(passed)
    assert passed.getMessage() == "redis unavailable (refused): admitting [41 more like this in the last 10s]"
    info = logging.LogRecord("crosslogic.x", logging.INFO, __file__, 1, "same", None, None)
    assert throttle.filter(info) and throttle.filter(info)  # only warnings and errors are throttled


# ------------------------------------------------------------------ the proof, under `crosslogic up --demo`


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Its own `crosslogic up --demo`: this module kills its children."""
    with up_demo(tmp_path_factory.mktemp("supervised")) as info:
        yield {**info, "state_dir": Path(info["state_dir"])}


def _children(stack: dict) -> dict:
    return json.loads((stack["state_dir"] / "runtime.json").read_text())["supervisor"]["children"]


@dataclass
class Traffic:
    served: dict[str, dict | None] = field(default_factory=dict)  # 200s: request id -> usage the client saw
    cut: dict[str, float] = field(default_factory=dict)  # 200s whose body broke off: request id -> when
    other: dict[str, int] = field(default_factory=dict)  # non-200 statuses and connection errors, counted
    last_ok: dict[str, float] = field(default_factory=dict)  # kind -> send time of the latest 200
    done: dict[str, float] = field(default_factory=dict)  # 200s read in full: request id -> when
    stopping: bool = False


async def _one(http: aiohttp.ClientSession, stack: dict, n: int, out: Traffic) -> None:
    stream = n % 3 == 0
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": f"count to {n % 7}"}],
            "max_tokens": 3 + n % 5}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    sent = time.monotonic()
    request_id = None
    try:
        async with http.post(stack["gateway_base"] + "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {stack['api_key']}"}) as response:
            if response.status != 200:
                await response.read()
                out.other[str(response.status)] = out.other.get(str(response.status), 0) + 1
                return
            request_id = response.headers["x-request-id"]
            out.served[request_id] = None  # a 200: billable from here on, whatever happens to the body
            if stream:
                usage = None
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
            else:
                usage = (await response.json())["usage"]
            out.served[request_id] = usage
            out.done[request_id] = time.monotonic()
            out.last_ok["chat"] = sent
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.other[type(exc).__name__] = out.other.get(type(exc).__name__, 0) + 1
        if request_id is not None:
            out.cut[request_id] = time.monotonic()


async def _traffic(stack: dict, out: Traffic) -> None:
    """Three clients, each one request after another with a short pause: steady load while parts die."""
    timeout = aiohttp.ClientTimeout(total=30, sock_connect=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async def client(offset: int) -> None:
            n = offset
            while not out.stopping:
                await _one(http, stack, n, out)
                n += 3
                await asyncio.sleep(0.02)

        await asyncio.gather(*(client(i) for i in range(3)))


async def _within(seconds: float, what: str, check) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"{what} not within {seconds:.0f}s"
        await asyncio.sleep(0.1)


async def _get(url: str, headers: dict | None = None) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http, \
                http.get(url, headers=headers or {}) as response:
            return response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return 0, ""


def _cli(stack: dict, *argv: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "crosslogic", *argv, "--state-dir", str(stack["state_dir"]),
                             "--json"], capture_output=True, text=True, timeout=60, cwd=repo_root(), check=True)
    return json.loads(result.stdout)


async def _chat_status(stack: dict, key: str, out: Traffic) -> int:
    """One chat completion with `key`; a 200 joins the traffic's served requests (it is billed too)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                http.post(stack["gateway_base"] + "/v1/chat/completions",
                          json={"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 1}, headers={"authorization": f"Bearer {key}"}) as response:
            body = await response.read()
            if response.status == 200:
                out.served[response.headers["x-request-id"]] = json.loads(body)["usage"]
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def _revoke(stack: dict, key_id: str) -> None:
    """As `crosslogic key revoke` does (the table's trigger notifies every ext_authz), without its start-up time."""
    conn = await asyncpg.connect(stack["database_url"])
    try:
        await conn.execute("UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE key_id = $1",
                           uuid.UUID(key_id))
    finally:
        await conn.close()


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def _serves_again(stack: dict, target: str, killed_at: float, out: Traffic) -> None:
    """The part that was killed does its job again (not merely: its process is back)."""
    ports = stack["ports"]
    if target == "api":
        async def models() -> bool:
            return (await _get(stack["gateway_url"] + "/models",
                               {"authorization": f"Bearer {stack['api_key']}"}))[0] == 200
        await _within(RECOVERY_S, "GET /v1/models", models)
    elif target == "valkey":  # admission goes through the limiter again, not around it (fail-open)
        url = f"http://127.0.0.1:{ports['authz_metrics']}/metrics"
        admitted = 'crosslogic_ratelimit_decisions_total{kind="",layer="",outcome="admitted"}'
        before = _metric((await _get(url))[1], admitted)

        async def limiter_back() -> bool:
            text = (await _get(url))[1]
            return ('crosslogic_dependency_down{dependency="redis"} 0.0' in text and
                    _metric(text, admitted) > before)
        await _within(RECOVERY_S, "limiter decisions through Valkey", limiter_back)
    elif target == "postgres":  # a key never used before authenticates (read from Postgres now), and revoking
        # it after its first use reaches ext_authz at once (its LISTEN feed is back; caches would hold it 30 s+)
        async def accepted() -> bool:
            return await _chat_status(stack, stack["fresh_key"]["api_key"], out) == 200
        await _within(RECOVERY_S, "a key never seen before", accepted)
        await _revoke(stack, stack["fresh_key"]["key_id"])

        async def refused() -> bool:
            return await _chat_status(stack, stack["fresh_key"]["api_key"], out) == 401
        await _within(RECOVERY_S, "the revocation reaching ext_authz", refused)
    elif target == "authz":  # a key revoked while ext_authz was down is refused by the new one (the shared
        # Redis tier still held it: nobody listened for the change)
        async def refused_after_restart() -> bool:
            return await _chat_status(stack, stack["fresh_key"]["api_key"], out) == 401
        await _within(RECOVERY_S, "a key revoked during the outage refused", refused_after_restart)
    elif target == "xds":  # Envoy's ADS stream is connected again
        async def connected() -> bool:
            text = (await _get(stack["envoy_admin_url"] + "/stats?filter=control_plane.connected_state"))[1]
            return text.strip().endswith("connected_state: 1")
        await _within(RECOVERY_S, "Envoy reconnected to xDS", connected)

    async def chat_ok() -> bool:
        return out.last_ok.get("chat", 0) > killed_at
    await _within(RECOVERY_S - (time.monotonic() - killed_at) + 0.5, "a chat completion sent after the kill",
                  chat_ok)


TARGETS = ("demo-node-1", "valkey", "postgres", "envoy", "authz", "accounting", "api", "xds")


async def test_each_part_killed_comes_back_within_seconds_and_no_usage_record_is_lost(stack):
    usage_log = stack["state_dir"] / "usage" / "envoy-usage.jsonl"
    log_inode = usage_log.stat().st_ino
    out = Traffic()
    load = asyncio.create_task(_traffic(stack, out))
    recovered: dict[str, float] = {}
    killed: dict[str, float] = {}
    try:
        await _within(RECOVERY_S, "traffic flowing", lambda: asyncio.sleep(0, bool(out.last_ok)))
        for target in TARGETS:
            if target in ("postgres", "authz"):
                stack["fresh_key"] = await asyncio.to_thread(_cli, stack, "key", "create", "--org", "demo",
                                                             "--env", "dev")
            if target == "authz":  # cached in ext_authz and in Redis before the kill
                assert await _chat_status(stack, stack["fresh_key"]["api_key"], out) == 200
            before = _children(stack)[target]
            assert before["state"] == "ready", before
            os.kill(before["pid"], signal.SIGKILL)
            killed_at = killed[target] = time.monotonic()
            if target == "authz":
                await _revoke(stack, stack["fresh_key"]["key_id"])

            async def restarted(target=target, before=before) -> bool:
                now = _children(stack)[target]
                return now["state"] == "ready" and now["restarts"] == before["restarts"] + 1
            await _within(RECOVERY_S, f"{target} restarted and ready", restarted)
            await _serves_again(stack, target, killed_at, out)
            recovered[target] = round(time.monotonic() - killed_at, 2)
            await asyncio.sleep(1.0)  # traffic over the restarted part before the next kill
    finally:
        out.stopping = True
        await load
    print(f"recovered in (s): {recovered}; 200s: {len(out.served)}; other outcomes: {out.other}")
    assert len(out.served) > 200
    assert usage_log.stat().st_ino == log_inode  # the restarted Envoy appends to the same spool

    node = next(n for n in stack["demo_nodes"] if n["name"] == "demo-node-1")

    async def node_serves() -> bool:  # the restarted node takes traffic again (its counters restarted at 0)
        status, text = await _get(node["url"] + "/sim/stats")
        return status == 200 and json.loads(text)["requests_total"] > 0
    if not await node_serves():
        out2 = Traffic()
        load = asyncio.create_task(_traffic(stack, out2))
        try:
            await _within(30, "demo-node-1 serving again", node_serves)
        finally:
            out2.stopping = True
            await load
        out.served.update(out2.served)
        out.cut.update(out2.cut)
        out.done.update(out2.done)

    # Streams Envoy itself was carrying when it was SIGKILLed: their access-log entry is written when they
    # end, which never happens (a known limit, docs/billing.md). Every other 200 must be in the ledger.
    in_flight_at_envoy_kill = {rid for rid, at in out.cut.items() if 0 <= at - killed["envoy"] < 5}
    # And the documented gap (docs/billing.md, "Envoy SIGKILL"): a response whose last byte left moments before
    # the kill can lose its line, still in Envoy's memory while its flush thread waited for a core.
    ended_just_before_envoy_kill = {rid for rid, at in out.done.items() if 0 <= killed["envoy"] - at < 0.25}
    required = [rid for rid in out.served
                if rid not in in_flight_at_envoy_kill and rid not in ended_just_before_envoy_kill]

    conn = await asyncpg.connect(stack["database_url"])
    try:
        async def all_recorded() -> bool:
            found = await conn.fetchval("SELECT count(*) FROM usage_records WHERE request_id = ANY($1)", required)
            return found == len(required)
        try:
            await _within(60, "every served request in the ledger", all_recorded)
        except AssertionError:
            ids = {r["request_id"] for r in await conn.fetch("SELECT request_id FROM usage_records")}
            missing = [rid for rid in required if rid not in ids]
            raise AssertionError(f"{len(missing)} of {len(required)} requests that got a 200 have no ledger row "
                                 f"(first: {missing[:3]}; cut off: {[m for m in missing if m in out.cut]})") from None
        rows = await conn.fetch("SELECT request_id, prompt_tokens, completion_tokens, usage_source, "
                                "count(*) OVER (PARTITION BY request_id) AS copies FROM usage_records")
    finally:
        await conn.close()
    by_id = {r["request_id"]: r for r in rows}
    assert all(r["copies"] == 1 for r in rows)
    lost = sorted(in_flight_at_envoy_kill - set(by_id))
    print(f"streams in flight when Envoy was killed: {len(in_flight_at_envoy_kill)}, unrecorded: {len(lost)}")
    assert len(lost) <= 3  # the three clients had at most one request each in flight
    lost_at_the_end = sorted(ended_just_before_envoy_kill - set(by_id))
    print(f"200s ended <= 0.25 s before Envoy was killed: {len(ended_just_before_envoy_kill)}, "
          f"unrecorded: {len(lost_at_the_end)}")
    assert len(lost_at_the_end) <= 3  # one per client at most: the line still waiting for the flush thread
    seen = {rid: u for rid, u in out.served.items() if u is not None and rid not in out.cut}
    assert len(seen) > 0.9 * len(out.served)
    assert {rid: (by_id[rid]["prompt_tokens"], by_id[rid]["completion_tokens"]) for rid in seen} == \
        {rid: (u["prompt_tokens"], u["completion_tokens"]) for rid, u in seen.items()}
    unbilled = [r for r in rows if r["request_id"] not in out.served and r["completion_tokens"] > 0]
    assert not unbilled, unbilled[:3]  # nothing billed that the client did not get
