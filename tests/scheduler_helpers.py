"""Simulated GPU nodes with real agents, joined to the session gateway stack (real Envoy, xDS, Postgres)."""

from __future__ import annotations

import asyncio
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import openai

from crosslogic import pki
from crosslogic.runtime.processes import free_port
from crosslogic.store import tenancy as t
from tests.gateway_helpers import client as gateway_client

WAIT_S = 30.0  # generous deadlines: the machine is shared; tests poll, never sleep a fixed time


@dataclass
class SimNode:
    name: str
    region: str
    port: int
    sim: subprocess.Popen | None  # None when the agent supervises the simulator
    agent: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stats(self) -> dict:
        async with aiohttp.ClientSession() as session, session.get(f"{self.url}/sim/stats") as response:
            return await response.json()

    async def requests_total(self) -> int:
        return (await self.stats())["requests_total"]


@dataclass
class Fleet:
    """Everything one test adds to the shared stack: its own regions, model, tenant and nodes."""

    gateway: dict
    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    nodes: list[SimNode] = field(default_factory=list)
    model: str = ""

    def region(self, name: str) -> str:
        return f"{name}-{self.tag}"

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.gateway["database_url"])

    async def setup(self, regions: dict[str, list[str]]) -> None:
        """Regions (short name -> fallback short names) and a model of this test's own."""
        self.model = f"m-{self.tag}"
        conn = await self.db()
        try:
            for name in regions:
                await t.add_region(conn, self.region(name), name, [])
            for name, chain in regions.items():
                await t.add_region(conn, self.region(name), name, [self.region(r) for r in chain])
            await t.add_model(conn, self.model, tokens_per_sec=1000)
        finally:
            await conn.close()

    async def client(self, region: str, org_name: str = "org") -> openai.AsyncOpenAI:
        return (await self.tenant(region, org_name))[1]

    async def tenant(self, region: str, org_name: str = "org") -> tuple[str, openai.AsyncOpenAI]:
        """A new org (with one env and key) in `region`: its id and an openai client using its key."""
        secret = (Path(self.gateway["state_dir"]) / "key_secret").read_text().strip().encode()
        conn = await self.db()
        try:
            org = await t.create_org(conn, f"{org_name}-{region}-{self.tag}", "serverless", [self.region(region)])
            env = await t.create_env(conn, org.org_id, "prod", self.region(region))
            _, key = await t.create_key(conn, secret, org.org_id, env.env_id, "k")
        finally:
            await conn.close()
        return org.org_id, gateway_client(self.gateway, key)

    def start_node(self, short: str, region: str, *, sim_args: tuple[str, ...] = (), agent_args: tuple[str, ...] = (),
                   scope: str = "pool:aws", cloud: str = "aws", supervised: bool = False) -> SimNode:
        """A simulated vLLM and its agent; `supervised`: the agent starts (and restarts) the simulator itself."""
        name = f"{short}-{self.tag}"
        port = free_port()
        sim_argv = [sys.executable, "-m", "crosslogic.sim", "--port", str(port), "--node-name", name,
                    "--model", self.model, *sim_args]
        sim = None if supervised else subprocess.Popen(
            sim_argv, stdout=subprocess.DEVNULL, stderr=open(self.workdir / f"{name}.sim.log", "wb"))  # noqa: SIM115
        if supervised:
            agent_args = ("--engine-command", shlex.join(sim_argv), *agent_args)
        node = SimNode(name, self.region(region), port, sim)
        self.nodes.append(node)
        tls = self.workdir / name
        pki.write(tls, "node", pki.issue_node(pki.load_ca(Path(self.gateway["pki_dir"])), name, scope))
        (tls / "ca.pem").write_bytes((Path(self.gateway["pki_dir"]) / pki.CA_CERT).read_bytes())
        node.agent = subprocess.Popen(
            [sys.executable, "-m", "crosslogic", "agent", "--control-plane", self.gateway["nodeagent_address"],
             "--name", name, "--region", node.region, "--model", self.model, "--advertise", node.address,
             "--cloud", cloud, "--tls-dir", str(tls), "--heartbeat-interval", "0.5", "--metrics-interval", "0.5",
             "--spot-interval", "0.1", "--warmup-requests", "0", *agent_args],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / f"{name}.agent.log", "wb"))  # noqa: SIM115
        return node

    def cluster(self, region: str) -> str:
        return f"{self.region(region)}/{self.model}"

    async def envoy_hosts(self, region: str) -> dict[str, dict[str, str]]:
        """Envoy's own view of one pool: address -> {health_flags, weight, priority, ...}."""
        prefix = f"{self.cluster(region)}::"
        async with aiohttp.ClientSession() as session, \
                session.get(f"{self.gateway['envoy_admin_url']}/clusters") as response:
            text = await response.text()
        hosts: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                parts = line[len(prefix):].split("::")
                if len(parts) == 3:
                    hosts.setdefault(parts[0], {})[parts[1]] = parts[2]
        return hosts

    async def wait_envoy(self, region: str, predicate, what: str) -> float:
        """Polls Envoy until `predicate(hosts)` holds; returns the seconds it took."""
        started = time.monotonic()
        while True:
            hosts = await self.envoy_hosts(region)
            if predicate(hosts):
                return time.monotonic() - started
            if time.monotonic() - started > WAIT_S:
                raise AssertionError(f"Envoy never showed {what}; hosts: {hosts}\n{self.logs()}")
            await asyncio.sleep(0.05)

    async def wait_healthy(self, region: str, nodes: list[SimNode]) -> None:
        await self.wait_envoy(region, lambda h: all(h.get(n.address, {}).get("health_flags") == "healthy"
                                                    for n in nodes), "every node healthy")

    async def envoy_stats(self, region: str) -> str:
        """Envoy's retry and upstream counters for one pool (diagnostics in assertion messages)."""
        pattern = f"cluster\\.{self.cluster(region)}\\.(upstream_rq|upstream_cx_none|retry)"
        url = f"{self.gateway['envoy_admin_url']}/stats?filter={pattern}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return "\n".join(line for line in (await response.text()).splitlines() if not line.endswith(": 0"))

    def logs(self) -> str:
        tails = []
        for path in sorted(self.workdir.glob("*.log")):
            tails.append(f"--- {path.name}\n{path.read_text()[-1500:]}")
        return "\n".join(tails)

    def stop(self) -> None:
        for node in self.nodes:
            for proc in (node.agent, node.sim):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)


async def chat(client: openai.AsyncOpenAI, model: str, max_tokens: int = 2) -> str:
    completion = await client.chat.completions.create(model=model, max_tokens=max_tokens,
                                                      messages=[{"role": "user", "content": "hi"}])
    return completion.choices[0].message.content
