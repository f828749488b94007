"""A simulated day of demand, time-compressed: the autoscaled fleet against a fixed fleet sized for the peak, in one
stack and one run (both pools get the same demand at the same moments, so machine load hits both alike).

Demand: closed-loop users through the real gateway (openai client, streamed chat completions), their number
following a diurnal curve (night trough, day peak) with a spike in the evening. The autoscaled pool runs spot
nodes from the local provider (real agents, simulated engines) under a fleet policy, and two of its nodes get a
spot notice during the day; the fixed pool is FIXED_NODES on-demand nodes for the whole day (nothing evicts them:
the baseline is the comfortable one). Printed: requests served and failed, p99 TTFT, node-hours and their cost at
the local provider's prices, and the ratios autoscaled / fixed.

    .venv/bin/python bench/fleet.py [--day-seconds 240]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import openai

from crosslogic.fleet.autoscaler import Autoscaler, AutoscalerOptions
from crosslogic.fleet.local import LocalOptions, LocalProvider
from crosslogic.fleet.provider import NodeSpec
from crosslogic.runtime.processes import free_port
from crosslogic.store import tenancy as t

MODEL = "day-model"
SIM_ARGS = ("--max-num-seqs", "4", "--tokens-per-sec", "50")  # one node: 4 sequences at once, 50 tokens/s each
MAX_TOKENS = 16
FIXED_NODES = 4  # what the peak needs: ~14 users at once / 4 sequences per node
PEAK_USERS = 14
EVICTIONS_AT_HOURS = (10.0, 15.0)


def users_at(hour: float) -> int:
    """Diurnal: 2 users at 04:00, PEAK_USERS - 4 in the afternoon, a spike to PEAK_USERS around 19:00."""
    base = 2 + (PEAK_USERS - 6) * (1 - math.cos(2 * math.pi * (hour - 4) / 24)) / 2
    spike = 4 * math.exp(-((hour - 19) ** 2) / 0.5)
    return max(1, round(base + spike))


@dataclass
class Result:
    ttfts: list[float] = field(default_factory=list)
    failed: int = 0
    node_seconds: float = 0.0  # compressed seconds of node time (launching ones included: a cloud bills them)
    cost_microdollars: float = 0.0


async def _wait(predicate, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


async def _one(client: openai.AsyncOpenAI, result: Result) -> None:
    started = time.perf_counter()
    try:
        stream = await client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, stream=True,
                                                      messages=[{"role": "user", "content": "what time is it"}])
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        result.ttfts.append(first if first is not None else time.perf_counter() - started)
    except openai.APIError:
        result.failed += 1


async def _drive(client: openai.AsyncOpenAI, result: Result, hour_of, stop: asyncio.Event) -> None:
    async def user(index: int) -> None:
        while not stop.is_set():
            if index < users_at(hour_of()):
                await _one(client, result)
            else:
                await asyncio.sleep(0.2)

    await asyncio.gather(*(user(i) for i in range(PEAK_USERS + 2)))


async def _meter(db: asyncpg.Pool, region: str, result: Result, prices: dict[bool, int], stop: asyncio.Event,
                 step_s: float = 0.5) -> None:
    last = time.monotonic()
    while not stop.is_set():
        rows = await db.fetch("SELECT spot FROM nodes WHERE region = $1 AND status IN "
                              "('provisioning', 'registering', 'active', 'draining')", region)
        now = time.monotonic()
        elapsed, last = now - last, now  # the time since the last sample, not the nominal step
        result.node_seconds += elapsed * len(rows)
        result.cost_microdollars += sum(prices[r["spot"]] for r in rows) * elapsed / 3600
        await asyncio.sleep(step_s)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def _start_stack(state: Path, ready: Path):
    log = open(state / "up.log", "wb")  # noqa: SIM115 - closed after the stack stops
    # The stack's own autoscaler sits out (one-hour tick): this process runs the replica it measures.
    up = subprocess.Popen([sys.executable, "-m", "crosslogic", "--state-dir", str(state), "up", "--port",
                           str(free_port()), "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, "CROSSLOGIC_FLEET_TICK": "3600"})
    return up, log


async def main(day_seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        state = Path(tmp)
        ready = state / "ready.json"
        up, log = _start_stack(state, ready)
        try:
            await _wait(lambda: asyncio.sleep(0, ready.exists()), "crosslogic up")
            info = json.loads(ready.read_text())
            await _run(info, state, day_seconds)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(60)
            log.close()


async def _run(info: dict, state: Path, day_seconds: float) -> None:
    db = await asyncpg.create_pool(info["database_url"], min_size=2, max_size=8)
    secret = (state / "key_secret").read_text().strip().encode()
    clients = {}
    for region in ("auto", "fixed"):
        await t.add_region(db, region, region, [])
    await t.add_model(db, MODEL, tokens_per_sec=200)
    for region in ("auto", "fixed"):
        org = await t.create_org(db, f"org-{region}", "serverless", [region])
        env = await t.create_env(db, org.org_id, "prod", region)
        _, key = await t.create_key(db, secret, org.org_id, env.env_id, "k")
        clients[region] = openai.AsyncOpenAI(base_url=info["gateway_url"], api_key=key, max_retries=0, timeout=120)
    options = LocalOptions(control_plane=info["nodeagent_address"], pki_dir=Path(info["pki_dir"]),
                           workdir=state / "machines", heartbeat_interval_s=0.5, metrics_interval_s=0.5,
                           sim_args=SIM_ARGS, agent_args=("--warmup-requests", "4"), stop_timeout_s=30)
    provider = LocalProvider(options, deque())
    await provider.start()
    prices = {True: options.spot_microdollars_per_hour, False: options.on_demand_microdollars_per_hour}
    hour_s = day_seconds / 24
    try:
        for i in range(FIXED_NODES):  # the baseline: on-demand, always there, registered before the day starts
            await provider.launch(NodeSpec(f"fixed-{i}", "fixed", MODEL, "aws", "L4", "L4:1", spot=False))
        await db.execute(
            "INSERT INTO fleet_policy (region, model, min_nodes, max_nodes, target_load, queue_capacity, "
            "scale_up_after_s, scale_down_after_s, cooldown_s, register_deadline_s, retry_base_s, spot) "
            "VALUES ('auto', $1, 1, $2, 0.6, 4, $3, $4, $5, 60, 1, true)", MODEL, FIXED_NODES + 1,
            hour_s / 6, hour_s, hour_s / 2)
        autoscaler = Autoscaler(db, provider, AutoscalerOptions(metrics_stale_s=5, drain_grace_s=1))
        stop = asyncio.Event()
        ticking = asyncio.create_task(autoscaler.run(0.5, stop))
        await _wait(lambda: _active(db, "fixed", FIXED_NODES), "the fixed fleet")
        await _wait(lambda: _active(db, "auto", 1), "the first autoscaled node")
        results = {"auto": Result(), "fixed": Result()}
        day_started = time.monotonic()

        def hour() -> float:
            return (time.monotonic() - day_started) / hour_s

        tasks = [asyncio.create_task(_drive(clients[r], results[r], hour, stop)) for r in results]
        tasks += [asyncio.create_task(_meter(db, r, results[r], prices, stop)) for r in results]
        evictions = list(EVICTIONS_AT_HOURS)
        while hour() < 24:
            if evictions and hour() >= evictions[0]:
                evictions.pop(0)
                victims = [r["name"] for r in await db.fetch(
                    "SELECT name FROM nodes WHERE region = 'auto' AND status = 'active' AND spot ORDER BY name")]
                if victims:
                    await provider.evict(victims[0], grace_s=hour_s / 2)
                    print(f"  {hour():5.1f} h: spot notice for {victims[0]}", flush=True)
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks, ticking)
        await autoscaler.settle(30)
        _report(results, hour_s)
    finally:
        await provider.close()
        for client in clients.values():
            await client.close()
        await db.close()


async def _active(db: asyncpg.Pool, region: str, n: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM nodes WHERE region = $1 AND status = 'active'", region) >= n


def _report(results: dict[str, Result], hour_s: float) -> None:
    auto, fixed = results["auto"], results["fixed"]
    rows = []
    for name, r in (("autoscaled (spot, evictions)", auto), (f"fixed, {FIXED_NODES} on-demand", fixed)):
        node_hours = r.node_seconds / hour_s
        rows.append((name, len(r.ttfts), r.failed, _p99(r.ttfts) * 1000, node_hours,
                     r.cost_microdollars / hour_s * 3600 / 1e6))
    print("| fleet | requests served | failed | p99 TTFT | node-hours | cost (local prices) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, served, failed, p99, hours, cost in rows:
        print(f"| {name} | {served:,} | {failed} | {p99:.0f} ms | {hours:.1f} | ${cost:.2f} |")
    a, f = rows
    print(f"ratios autoscaled/fixed: requests {a[1] / max(1, f[1]):.2f}, p99 TTFT {a[3] / f[3]:.2f}, "
          f"node-hours {a[4] / f[4]:.2f}, cost {a[5] / f[5]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--day-seconds", type=float, default=240.0, help="wall-clock seconds for the 24 h day")
    asyncio.run(main(parser.parse_args().day_seconds))
