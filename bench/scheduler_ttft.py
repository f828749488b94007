"""Part (b) of bench/scheduler.py: TTFT through the real gateway over heterogeneous simulated nodes with agents.

One fast node (16 sequences at once) and two slow ones (2 at once: the rest queue, as vLLM does when its
batch is full). The same stream of requests runs twice in one stack: with static equal weights (the spine's
behaviour: LEAST_REQUEST over equal weights; policy `load_aware = false`), then with the load-aware weights.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import openai

from crosslogic import pki
from crosslogic.runtime.processes import free_port
from crosslogic.store import tenancy as t

REGION, MODEL = "bench", "bench-model"
# name, max concurrent sequences, declared capacity (tokens/s) told to the control plane
NODES = [("fast", 16, 3200), ("slow-1", 2, 400), ("slow-2", 2, 400)]
TOKENS_PER_SEC = 200  # per sequence, every node
CONCURRENCY = 12
MAX_TOKENS = 20


def _spawn(argv: list[str], log: Path | None = None) -> subprocess.Popen:
    err = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.DEVNULL, stderr=err)


async def _wait(predicate, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def _requests_total(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/sim/stats") as response:
        return (await response.json())["requests_total"]


async def _ttft_run(client: openai.AsyncOpenAI, count: int) -> list[float]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> float:
        async with gate:
            started = time.perf_counter()
            stream = await client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, stream=True,
                                                          messages=[{"role": "user", "content": "bench"}])
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
            return first if first is not None else float("nan")

    return await asyncio.gather(*(one() for _ in range(count)))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_ttft_bench(count: int) -> dict[str, dict[str, float]]:
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        ready = state / "ready.json"
        up = _spawn(["crosslogic", "--state-dir", str(state), "up", "--port", str(free_port()),
                     "--ready-file", str(ready)], state / "up.log")
        try:
            await _wait(lambda: asyncio.sleep(0, ready.exists()), "crosslogic up", 120)
            info = json.loads(ready.read_text())
            conn = await asyncpg.connect(info["database_url"])
            await t.add_region(conn, REGION, "Bench", [])
            await t.add_model(conn, MODEL, tokens_per_sec=1000)
            org = await t.create_org(conn, "bench-org", "serverless", [REGION])
            env = await t.create_env(conn, org.org_id, "prod", REGION)
            secret = (state / "key_secret").read_text().strip().encode()
            _, key = await t.create_key(conn, secret, org.org_id, env.env_id, "bench")
            await conn.execute("INSERT INTO routing_policy (region, load_aware) VALUES ($1, false)", REGION)

            ca = pki.load_ca(Path(info["pki_dir"]))
            urls = {}
            for name, seqs, capacity in NODES:
                port = free_port()
                procs.append(_spawn(
                    ["crosslogic.sim", "--port", str(port), "--node-name", name, "--model", MODEL,
                     "--tokens-per-sec", str(TOKENS_PER_SEC), "--max-num-seqs", str(seqs), "--ttft-ms", "5"]))
                tls = state / f"tls-{name}"
                pki.write(tls, "node", pki.issue_node(ca, name, "pool:aws"))
                (tls / "ca.pem").write_bytes((Path(info["pki_dir"]) / pki.CA_CERT).read_bytes())
                procs.append(_spawn(
                    ["crosslogic", "agent", "--control-plane", info["nodeagent_address"],
                     "--name", name, "--region", REGION, "--model", MODEL, "--advertise", f"127.0.0.1:{port}",
                     "--cloud", "aws", "--tls-dir", str(tls), "--tokens-per-sec", str(capacity),
                     "--heartbeat-interval", "1", "--metrics-interval", "0.5"], state / f"agent-{name}.log"))
                urls[name] = f"http://127.0.0.1:{port}"
            client = openai.AsyncOpenAI(base_url=info["gateway_url"], api_key=key, max_retries=0, timeout=120)

            async def served() -> bool:
                try:
                    await client.chat.completions.create(model=MODEL, max_tokens=1,
                                                         messages=[{"role": "user", "content": "warm"}])
                    return await conn.fetchval("SELECT count(*) FROM nodes WHERE region = $1", REGION) == 3
                except openai.APIError:
                    return False

            await _wait(served, "the bench pool serving")
            await asyncio.sleep(2)  # every agent has reported load at least once
            results = {}
            for name, load_aware in (("static equal weights", False), ("load-aware weights", True)):
                await conn.execute("UPDATE routing_policy SET load_aware = $2 WHERE region = $1", REGION, load_aware)
                await asyncio.sleep(2)  # applied within ~1 s; leave margin on a busy machine
                before = await _requests_total(urls["fast"])
                ttfts = await _ttft_run(client, count)
                fast = await _requests_total(urls["fast"]) - before
                results[name] = {"p50": statistics.median(ttfts), "p99": _percentile(ttfts, 0.99),
                                 "fast_share": fast / count}
            await client.close()
            await conn.close()
            return results
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            up.send_signal(signal.SIGTERM)
            up.wait(60)
