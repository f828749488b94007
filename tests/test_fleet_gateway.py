"""The fleet end to end with the local provider: real agents over mutual TLS supervising simulated engines, the
real xDS/NodeAgent process, Envoy and Postgres of a `crosslogic up --demo` stack, driven with the openai client.

The autoscaler replicas run in the test process (clock, provider and its fault plan injected). The stack's own
`serve fleet` gets a one-hour tick here, so the test's replicas are the only ones deciding for the test's pools
(test_stack_serves_a_fleet_pool covers the service itself, on the shared stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import openai
import pytest
from openai.types.chat import ChatCompletion

from crosslogic.accounting.finops import load_report
from crosslogic.fleet.autoscaler import Autoscaler, AutoscalerOptions
from crosslogic.fleet.local import LocalOptions, LocalProvider
from tests.conftest import _run_stack
from tests.scheduler_helpers import Fleet

WAIT_S = 60.0
TICK_S = 0.3


@pytest.fixture(scope="module")
def fleet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    yield from _run_stack(tmp_path_factory, "authz", "http", {"CROSSLOGIC_FLEET_TICK": "3600"})


@dataclass
class Pool:
    fleet: Fleet
    provider: LocalProvider
    db: asyncpg.Pool
    region: str

    async def policy(self, **values) -> None:
        row = {"min_nodes": 1, "max_nodes": 3, "target_load": 0.5, "queue_capacity": 2, "scale_up_after_s": 0.5,
               "scale_down_after_s": 2.0, "cooldown_s": 2.0, "register_deadline_s": 30.0, "retry_base_s": 0.5,
               "spot": True, "on_demand_fallback": True, "engine": "vllm", **values}
        columns = ", ".join(row)
        await self.db.execute(
            f"INSERT INTO fleet_policy (region, model, {columns}) VALUES ($1, $2, "  # noqa: S608 - test only
            f"{', '.join(f'${i + 3}' for i in range(len(row)))}) ON CONFLICT (region, model) DO UPDATE SET "
            f"{', '.join(f'{c} = EXCLUDED.{c}' for c in row)}", self.region, self.fleet.model, *row.values())

    def autoscaler(self, clock=time.time) -> Autoscaler:
        return Autoscaler(self.db, self.provider, AutoscalerOptions(metrics_stale_s=5, drain_grace_s=1.0), clock)

    async def nodes(self) -> dict[str, tuple[str, str]]:
        rows = await self.db.fetch("SELECT name, status, status_reason FROM nodes WHERE region = $1", self.region)
        return {r["name"]: (r["status"], r["status_reason"]) for r in rows}

    async def count(self, status: str) -> int:
        return sum(1 for s, _ in (await self.nodes()).values() if s == status)

    async def wait(self, predicate, what: str, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not await predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {what}: {await self.nodes()}\n{self.logs()}")
            await asyncio.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1200:]}" for p in sorted(self.provider.options.workdir.glob(
            "*.log")))


@contextlib.asynccontextmanager
async def _pool(gateway: dict, tmp_path: Path, sim_args: tuple[str, ...] = (), plan: tuple[str, ...] = ()
                ) -> AsyncIterator[Pool]:
    fleet = Fleet(gateway, tmp_path)
    await fleet.setup({"r": []})
    provider = LocalProvider(LocalOptions(
        control_plane=gateway["nodeagent_address"], pki_dir=Path(gateway["pki_dir"]), workdir=tmp_path / "machines",
        heartbeat_interval_s=0.3, metrics_interval_s=0.3, sim_args=sim_args, agent_args=("--warmup-requests", "2"),
        stop_timeout_s=20), deque(plan))
    await provider.start()
    db = await asyncpg.create_pool(gateway["database_url"], min_size=1, max_size=6)
    try:
        yield Pool(fleet, provider, db, fleet.region("r"))
    finally:
        await provider.close()
        await db.close()
        fleet.stop()


@contextlib.asynccontextmanager
async def ticking(*autoscalers: Autoscaler) -> AsyncIterator[None]:
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(a.run(TICK_S, stopping)) for a in autoscalers]
    try:
        yield
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
        for a in autoscalers:
            await a.settle(30)


async def _stream(client: openai.AsyncOpenAI, model: str, tokens: int) -> int:
    stream = await client.chat.completions.create(model=model, max_tokens=tokens, stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "load"}])
    usage = 0
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return usage


async def test_pool_scales_out_under_load_and_back_by_draining_with_zero_failed_requests(fleet_stack, tmp_path):
    async with _pool(fleet_stack, tmp_path, ("--max-num-seqs", "2", "--tokens-per-sec", "40")) as pool:
        await pool.policy(min_nodes=1, max_nodes=3, target_load=0.6)  # one light stream (~0.5) is calm
        client = await pool.fleet.client("r")
        outcomes: list[object] = []
        heavy = asyncio.Event()
        heavy.set()
        done = asyncio.Event()

        async def user(light: bool) -> None:
            while not done.is_set() and (light or heavy.is_set()):
                try:
                    outcomes.append(await _stream(client, pool.fleet.model, 20))
                except openai.APIError as exc:
                    outcomes.append(exc)
                if light:
                    await asyncio.sleep(1.5)  # light load: idle nodes appear, so the pool can shrink

        async with ticking(pool.autoscaler()):
            await pool.wait(lambda: _active(pool, 1), "the first node active")
            # The registry says active a moment before Envoy has the new pool's route (the xDS push follows the
            # NOTIFY): requests sent in between get the honest 503 "not available in your region right now"
            # (CI: the 8 users started in that gap). Zero failures is promised from a serving pool on.
            await pool.wait(lambda: _served(client, pool.fleet.model), "the pool served through the gateway")
            # one light user: a single stream (40 of ~80 tokens/s) is already half a node's load, the target
            users = [asyncio.create_task(user(light=i == 0)) for i in range(8)]
            await pool.wait(lambda: _active(pool, 3), "the pool grown to 3 nodes under load")
            heavy.clear()
            await pool.wait(lambda: _terminated(pool, 2), "two nodes drained and given back", timeout_s=90)
            done.set()
            await asyncio.gather(*users)
        failures = [o for o in outcomes if isinstance(o, Exception)]
        assert not failures, failures[:3]
        assert len(outcomes) > 20 and all(o == 20 for o in outcomes)
        assert await pool.count("active") == 1
        reasons = {r for s, r in (await pool.nodes()).values() if s == "terminated"}
        assert reasons == {"scale down"}
        actions = await pool.db.fetch("SELECT action FROM audit_log WHERE actor LIKE 'fleet:%' AND target_id IN "
                                      "(SELECT name FROM fleet_machines WHERE region = $1)", pool.region)
        assert {a["action"] for a in actions} >= {"fleet.launch", "fleet.drain", "fleet.terminate"}


async def _routed_chat(client: openai.AsyncOpenAI, model: str, **request) -> ChatCompletion | None:
    """The chat completion, or None while Envoy has no route for the pool yet (its 503 model_unavailable)."""
    try:
        return await client.chat.completions.create(model=model, **request)
    except openai.InternalServerError as exc:
        if exc.code == "model_unavailable":
            return None
        raise


async def _served(client: openai.AsyncOpenAI, model: str) -> bool:
    return await _routed_chat(client, model, max_tokens=1, messages=[{"role": "user", "content": "x"}]) is not None


async def _active(pool: Pool, n: int) -> bool:
    return await pool.count("active") >= n


async def _terminated(pool: Pool, n: int) -> bool:
    return await pool.count("terminated") >= n


async def test_spot_warning_gets_a_replacement_registered_before_the_evicted_node_is_gone(fleet_stack, tmp_path):
    async with _pool(fleet_stack, tmp_path) as pool:
        await pool.policy(min_nodes=1, max_nodes=2, cooldown_s=600)  # the replacement ignores the cooldown
        async with ticking(pool.autoscaler()):
            await pool.wait(lambda: _active(pool, 1), "the first node active")
            (evicted,) = [n for n, (s, _) in (await pool.nodes()).items() if s == "active"]
            grace_s = 30.0  # AWS gives two minutes
            noticed = time.monotonic()
            await pool.provider.evict(evicted, grace_s=grace_s)
            await pool.wait(lambda: _replacement_active(pool, evicted), "the replacement active")
            assert time.monotonic() - noticed < grace_s  # registered before the cloud takes the evicted machine
            status, reason = (await pool.nodes())[evicted]
            assert status in ("draining", "dead", "terminated") and reason.startswith("spot eviction")
            replaces = await pool.db.fetchval("SELECT replaces FROM fleet_machines WHERE replaces IS NOT NULL "
                                              "AND region = $1", pool.region)
            assert replaces == evicted
        assert len(pool.provider.launches) == 2  # one node, one replacement: never a second one


async def _replacement_active(pool: Pool, evicted: str) -> bool:
    return any(s == "active" and n != evicted for n, (s, _) in (await pool.nodes()).items())


async def test_a_launch_that_never_registers_is_replaced_and_missing_spot_capacity_falls_back(fleet_stack, tmp_path):
    async with _pool(fleet_stack, tmp_path, plan=("no-spot-capacity", "no-register")) as pool:
        await pool.policy(min_nodes=1, max_nodes=1, register_deadline_s=4, retry_base_s=30)
        async with ticking(pool.autoscaler()):
            await pool.wait(lambda: _active(pool, 1), "a node active in the end")
        rows = await pool.db.fetch("SELECT spot, state, reason FROM fleet_machines WHERE region = $1 "
                                   "ORDER BY launched_at", pool.region)
        states = [(r["spot"], r["state"]) for r in rows]
        assert states[:2] == [(True, "failed"), (False, "terminated")] and len(states) == 3
        assert states[2] in ((False, "registering"), (False, "running"))  # running from the next tick on
        nodes = await pool.nodes()
        assert sorted(r for s, r in nodes.values() if s == "terminated")[1] == "never registered"
        assert sum(1 for s, _ in nodes.values() if s == "active") == 1  # max_nodes held throughout


async def test_two_autoscaler_replicas_never_launch_twice_for_one_need(fleet_stack, tmp_path):
    async with _pool(fleet_stack, tmp_path) as pool:
        await pool.policy(min_nodes=2, max_nodes=3, reserved_tokens_per_sec=0)
        one, two = pool.autoscaler(), pool.autoscaler()
        for _ in range(15):
            await asyncio.gather(one.tick(), two.tick(), one.tick(), two.tick())
        await one.settle(30)
        await two.settle(30)
        assert len(pool.provider.launches) == 2
        assert await pool.db.fetchval("SELECT count(*) FROM fleet_machines WHERE region = $1", pool.region) == 2


async def test_reserved_capacity_floor_holds_and_fleet_prices_reach_finops(fleet_stack, tmp_path):
    async with _pool(fleet_stack, tmp_path) as pool:
        # 1500 reserved tokens/s on nodes of 1000: a floor of two nodes, whatever min_nodes says.
        await pool.policy(min_nodes=0, max_nodes=2, reserved_tokens_per_sec=1500, node_tokens_per_sec=1000,
                          scale_down_after_s=0, cooldown_s=0)
        async with ticking(pool.autoscaler()):
            await pool.wait(lambda: _active(pool, 2), "the reserved floor of two nodes")
            await asyncio.sleep(2)  # idle nodes, no calm delay, no cooldown: still nothing drained below the floor
            assert await pool.count("active") == 2 and await pool.count("draining") == 0
        prices = await pool.db.fetch("SELECT microdollars_per_hour FROM node_lifetimes WHERE node_name IN "
                                     "(SELECT name FROM fleet_machines WHERE region = $1)", pool.region)
        assert {p["microdollars_per_hour"] for p in prices} == {pool.provider.options.spot_microdollars_per_hour}
        async with pool.db.acquire() as conn:
            end = await conn.fetchval("SELECT now()")
            rows = [r for r in await load_report(conn, end.replace(year=end.year - 1), end)
                    if r["region"] == pool.region]
        assert rows and rows[0]["gpu_cost_microdollars"] > 0  # spot hours at the provider's price, no gpu_prices row


async def test_an_sglang_node_serves_through_the_gateway_with_exact_usage(fleet_stack, tmp_path):
    async with _pool(fleet_stack, tmp_path, ("--max-model-len", "1024")) as pool:
        await pool.policy(min_nodes=1, max_nodes=1, engine="sglang")
        async with ticking(pool.autoscaler()):
            await pool.wait(lambda: _active(pool, 1), "the SGLang node active")
        row = await pool.db.fetchrow("SELECT engine, throughput_tokens_per_sec, prefill_tokens_per_sec FROM nodes "
                                     "WHERE region = $1 AND status = 'active'", pool.region)
        assert row["engine"] == "sglang" and row["throughput_tokens_per_sec"] > 0 and row["prefill_tokens_per_sec"] > 0
        org_id, client = await pool.fleet.tenant("r")
        seen_prompt = seen_completion = 0
        deadline = time.monotonic() + WAIT_S
        for i in range(4):
            request = {"max_tokens": 3 + i, "messages": [{"role": "user", "content": "hello " * i}]}
            # Active in Postgres a moment before Envoy has the pool's route (the xDS push follows the NOTIFY):
            # the first request is sent again until it is served (a 503 is no 200 row); every answer is counted.
            while (answer := await _routed_chat(client, pool.fleet.model, **request)) is None:
                assert i == 0 and time.monotonic() < deadline, "the SGLang node never served through the gateway"
                await asyncio.sleep(0.05)
            assert answer.choices[0].message.content
            seen_prompt += answer.usage.prompt_tokens
            seen_completion += answer.usage.completion_tokens
        for tokens in (5, 1):
            prompt, completion = await _stream_usage(client, pool.fleet.model, tokens)
            seen_prompt += prompt
            seen_completion += completion
        with pytest.raises(openai.BadRequestError) as refused:  # SGLang's top-level error JSON, made OpenAI's
            await client.chat.completions.create(model=pool.fleet.model, max_tokens=10,
                                                 messages=[{"role": "user", "content": "x " * 2000}])
        assert refused.value.status_code == 400 and "context length" in refused.value.body["message"]
        deadline = time.monotonic() + WAIT_S
        while True:
            got = await pool.db.fetchrow("SELECT count(*) AS n, sum(prompt_tokens) AS p, sum(completion_tokens) AS c "
                                         "FROM usage_records WHERE org_id = $1::uuid AND status_code = 200", org_id)
            if got["n"] >= 6 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert (got["n"], got["p"], got["c"]) == (6, seen_prompt, seen_completion)


async def _stream_usage(client: openai.AsyncOpenAI, model: str, tokens: int) -> tuple[int, int]:
    stream = await client.chat.completions.create(model=model, max_tokens=tokens, stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "count me"}])
    usage = (0, 0)
    async for chunk in stream:
        if chunk.usage:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    return usage


def _cli(gateway: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosslogic", "--state-dir", gateway["state_dir"], *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "USER": "ops"})


async def test_stack_serves_a_fleet_pool_edited_with_the_cli(gateway, tmp_path):
    """The shared stack's own `serve fleet` (started by `crosslogic up`) follows a policy set with the CLI."""
    fleet = Fleet(gateway, tmp_path)
    await fleet.setup({"r": []})
    region = fleet.region("r")
    refused = _cli(gateway, "fleet", "policy", "set", region, fleet.model, "--min-nodes", "3", "--max-nodes", "2")
    assert refused.returncode == 2 and "min_nodes (3) is above max_nodes (2)" in refused.stderr
    saved = _cli(gateway, "fleet", "policy", "set", region, fleet.model, "--min-nodes", "1", "--max-nodes", "1",
                 "--no-spot", "--engine", "sglang")
    assert saved.returncode == 0, saved.stderr
    conn = await fleet.db()
    try:
        deadline = time.monotonic() + WAIT_S
        while await conn.fetchval("SELECT count(*) FROM nodes WHERE region = $1 AND status = 'active'", region) < 1:
            assert time.monotonic() < deadline, _cli(gateway, "node", "list", "--region", region).stdout
            await asyncio.sleep(0.2)
        client = await fleet.client("r")
        while not await _served(client, fleet.model):  # active in Postgres a moment before Envoy has the route
            assert time.monotonic() < deadline, "the pool never served through the gateway"
            await asyncio.sleep(0.05)
        answer = await client.chat.completions.create(model=fleet.model, max_tokens=2,
                                                      messages=[{"role": "user", "content": "hi"}])
        assert answer.usage.completion_tokens == 2
        listed = json.loads(_cli(gateway, "node", "list", "--region", region, "--json").stdout)
        assert [(n["status"], n["engine"]) for n in listed] == [("active", "sglang")]
        shown = _cli(gateway, "fleet", "policy", "show")
        assert f"{region}/{fleet.model}" in shown.stdout and "accepted" in shown.stdout
        # Down to zero: the node drains, the machine is given back, the row stays as terminated.
        assert _cli(gateway, "fleet", "policy", "set", region, fleet.model, "--min-nodes", "0",
                    "--scale-down-after", "0", "--cooldown", "0").returncode == 0
        deadline = time.monotonic() + WAIT_S
        while await conn.fetchval("SELECT count(*) FROM nodes WHERE region = $1 AND status = 'terminated'",
                                  region) < 1:
            assert time.monotonic() < deadline, _cli(gateway, "node", "list", "--region", region).stdout
            await asyncio.sleep(0.2)
        listed = json.loads(_cli(gateway, "node", "list", "--region", region, "--json").stdout)
        assert [(n["status"], n["status_reason"]) for n in listed] == [("terminated", "scale down")]
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE action = 'fleet.policy_set' AND actor = 'ops' "
                                   "AND target_id = $1", f"{region}/{fleet.model}") == 2
    finally:
        _cli(gateway, "fleet", "policy", "remove", region, fleet.model)
        # The shared stack's demo env may use every active model: leave none of this test's behind.
        await conn.execute("UPDATE models SET status = 'disabled' WHERE model_id = $1", fleet.model)
        await conn.close()
        fleet.stop()
