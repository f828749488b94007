"""Active-active replicas (`crosslogic up --replicas 2`, docs/deploy.md): a replica of any control-plane service
dies under steady load and no client sees an error; every usage record is in the ledger exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.cluster import RedisCluster

from crosslogic.ratelimit.engine import org_tag
from tests.conftest import up_demo

RECOVERY_S = 60.0


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Its own stack (this module kills its children): 2 replicas of every service, 2 Envoys on one port, a
    3-primary Valkey Cluster."""
    with up_demo(tmp_path_factory.mktemp("replicas"), up_args=("--replicas", "2", "--redis-cluster")) as info:
        yield {**info, "state_dir": Path(info["state_dir"])}


def _children(stack: dict) -> dict:
    return json.loads((stack["state_dir"] / "runtime.json").read_text())["supervisor"]["children"]


@dataclass
class Load:
    served: dict[str, dict] = field(default_factory=dict)  # request id -> the usage the client saw
    errors: dict[str, list[str]] = field(default_factory=dict)  # kind -> what went wrong, per request
    done: dict[str, int] = field(default_factory=dict)  # kind -> requests answered in full
    stopping: bool = False

    def failed(self, kind: str, what: str) -> None:
        self.errors.setdefault(kind, []).append(what)


async def _chat(http: aiohttp.ClientSession, stack: dict, n: int, stream: bool, out: Load) -> None:
    kind = "stream" if stream else "chat"
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": f"count to {n % 7}"}],
            "max_tokens": 3 + n % 5}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    try:
        async with http.post(stack["gateway_base"] + "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {stack['api_key']}"}) as response:
            if response.status != 200:
                out.failed(kind, f"{response.status} {(await response.read())[:200]!r}")
                return
            request_id = response.headers["x-request-id"]
            usage = None
            if stream:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
            else:
                usage = (await response.json())["usage"]
            if usage is None:
                out.failed(kind, "no usage in the answer")
                return
            out.served[request_id] = usage
            out.done[kind] = out.done.get(kind, 0) + 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.failed(kind, repr(exc))


async def _models(http: aiohttp.ClientSession, stack: dict, out: Load) -> None:
    try:
        async with http.get(stack["gateway_url"] + "/models",
                            headers={"authorization": f"Bearer {stack['api_key']}"}) as response:
            text = await response.text()
            if response.status != 200 or "llama-3-8b" not in text:
                out.failed("models", f"{response.status} {text[:200]}")
                return
            out.done["models"] = out.done.get("models", 0) + 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.failed("models", repr(exc))


async def _load(stack: dict, out: Load) -> None:
    """Five clients one request after another: two non-streaming, two streaming, one listing models."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, sock_connect=2)) as http:
        async def client(index: int) -> None:
            n = index
            while not out.stopping:
                if index == 4:
                    await _models(http, stack, out)
                else:
                    await _chat(http, stack, n, stream=index >= 2, out=out)
                n += 5
                await asyncio.sleep(0.01)

        await asyncio.gather(*(client(i) for i in range(5)))


async def _within(seconds: float, what: str, check) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {seconds:.0f}s"
        await asyncio.sleep(0.1)


KILLED = ("authz-1", "accounting-1", "api-1", "xds-1", "authz-2", "accounting-2", "xds-2", "valkey-primary")


def _valkey_primary_of_the_demo_org(stack: dict) -> str:
    """The cluster node serving the demo org's limiter keys now (its hash tag's slot)."""
    with RedisCluster.from_url(stack["redis_url"]) as cluster:
        node = cluster.get_node_from_key(org_tag(stack["org_id"]))
        return f"valkey-{node.port}"


def _admin(url: str, path: str) -> str:
    with urllib.request.urlopen(url + path, timeout=5) as response:
        return response.read().decode()


def _listener_changes(stack: dict) -> list[str]:
    """Per Envoy: listeners added, modified, removed (a flap drains the gateway listener and builds it again)."""
    return [" ".join(line for line in _admin(url, "/stats?filter=^listener_manager.listener_(added|modified|removed)$")
                     .splitlines()) for url in stack["envoy_admin_urls"]]


def _dynamic_versions(url: str) -> dict[str, str]:
    dump = json.loads(_admin(url, "/config_dump?resource=dynamic_active_clusters"))["configs"]
    dump += json.loads(_admin(url, "/config_dump?resource=dynamic_listeners"))["configs"]
    return {c.get("name") or c["cluster"]["name"]: c.get("version_info") or c["active_state"]["version_info"]
            for c in dump}


async def test_killing_any_replica_costs_no_client_a_request_and_no_usage_record(replicated):
    stack = replicated
    listeners_before = _listener_changes(stack)
    children = _children(stack)
    assert {f"{s}-{i}" for s in ("authz", "accounting", "api", "xds", "envoy") for i in (1, 2)} <= set(children)
    out = Load()
    load = asyncio.create_task(_load(stack, out))
    try:
        await _within(RECOVERY_S, "traffic flowing", lambda: out.done.get("chat", 0) > 5)
        for target in KILLED:
            if target == "valkey-primary":  # its replica takes over; the old primary comes back as a replica
                target = _valkey_primary_of_the_demo_org(stack)
            before = _children(stack)[target]
            assert before["state"] == "ready", before
            answered = sum(out.done.values())
            os.kill(before["pid"], signal.SIGKILL)

            def restarted(target=target, before=before) -> bool:
                now = _children(stack)[target]
                return now["state"] == "ready" and now["restarts"] == before["restarts"] + 1
            await _within(RECOVERY_S, f"{target} restarted and ready", restarted)
            # Requests kept being answered across the kill, and some go over the restarted replica too.
            await _within(RECOVERY_S, "traffic after the kill", lambda a=answered: sum(out.done.values()) > a + 20)
            await asyncio.sleep(1.5)
    finally:
        out.stopping = True
        await load
    print(f"answered: {out.done}; errors: { {k: len(v) for k, v in out.errors.items()} }")
    # Both xDS replicas were killed in turn and every Envoy reconnected to the other one: no listener was
    # rebuilt, and both Envoys hold the same versions (the same snapshot, whichever replica sent it).
    assert _listener_changes(stack) == listeners_before
    first, second = (_dynamic_versions(url) for url in stack["envoy_admin_urls"])
    assert first == second and first
    assert out.errors == {}, out.errors
    assert out.done["chat"] > 50 and out.done["stream"] > 50 and out.done["models"] > 20

    conn = await asyncpg.connect(stack["database_url"])
    try:
        ids = list(out.served)
        deadline = time.monotonic() + RECOVERY_S
        while True:
            rows = await conn.fetch("SELECT request_id, prompt_tokens, completion_tokens FROM usage_records "
                                    "WHERE request_id = ANY($1)", ids)
            if len(rows) == len(ids) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    assert len(rows) == len(ids), f"{len(ids) - len(rows)} of {len(ids)} served requests missing from the ledger"
    for row in rows:  # exactly the usage each client saw (a request id is unique in the ledger)
        usage = out.served[row["request_id"]]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"],
                                                                    usage["completion_tokens"])
