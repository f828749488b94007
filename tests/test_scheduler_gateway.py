"""The scheduler end to end: real Envoy, the xDS/NodeAgent process, simulated vLLM nodes with real agents
(over mutual TLS), driven with the official openai client. Each test brings its own regions, model and tenant."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
from aiohttp import web

from crosslogic import pki
from crosslogic.agent.proto import nodeagent_pb2 as pb
from crosslogic.agent.proto import nodeagent_pb2_grpc as pb_grpc
from crosslogic.runtime.processes import free_port
from tests.scheduler_helpers import WAIT_S, Fleet, chat


@pytest.fixture
async def fleet(gateway, tmp_path):
    f = Fleet(gateway, tmp_path)
    try:
        yield f
    finally:
        f.stop()


async def _load_directly(node_url: str, model: str, streams: int, max_tokens: int) -> list[asyncio.Task]:
    """Long generations sent straight to a node (not through the gateway): load other Envoys would bring."""

    async def one(session: aiohttp.ClientSession) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "load"}], "max_tokens": max_tokens,
                "stream": True}
        async with session.post(f"{node_url}/v1/chat/completions", json=body) as response:
            async for _ in response.content:
                pass

    session = aiohttp.ClientSession()
    tasks = [asyncio.create_task(one(session)) for _ in range(streams)]
    closer = asyncio.create_task(_close_after(session, tasks))
    return [*tasks, closer]


async def _close_after(session: aiohttp.ClientSession, tasks: list[asyncio.Task]) -> None:
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await session.close()


async def _send_many(client: openai.AsyncOpenAI, model: str, count: int, concurrency: int) -> list[object]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> object:
        async with gate:
            try:
                return await chat(client, model)
            except openai.APIError as exc:
                return exc

    return await asyncio.gather(*(one() for _ in range(count)))


async def test_heavier_node_gets_less_traffic(fleet):
    await fleet.setup({"r": []})
    conn = await fleet.db()
    try:  # decide on decode headroom only, so the test controls the one signal it loads
        await conn.execute("INSERT INTO routing_policy (region, score_weights) VALUES ($1, $2::jsonb)",
                           fleet.region("r"), json.dumps({"throughput": 1.0}))
    finally:
        await conn.close()
    sim = ("--tokens-per-sec", "100")
    heavy = fleet.start_node("heavy", "r", sim_args=sim, agent_args=("--tokens-per-sec", "1000"))
    light = fleet.start_node("light", "r", sim_args=sim, agent_args=("--tokens-per-sec", "1000"))
    client = await fleet.client("r")
    await fleet.wait_healthy("r", [heavy, light])

    load = await _load_directly(heavy.url, fleet.model, streams=30, max_tokens=4000)  # ~3,000 tokens/s > capacity
    try:
        await fleet.wait_envoy("r", lambda h: h.get(heavy.address, {}).get("weight") == "1"
                               and h.get(light.address, {}).get("weight") == "100", "the heavy node's weight drop")
        before = {n.name: await n.requests_total() for n in (heavy, light)}
        results = await _send_many(client, fleet.model, 60, concurrency=4)
        assert all(isinstance(r, str) for r in results), [r for r in results if not isinstance(r, str)]
        to_heavy = await heavy.requests_total() - before[heavy.name]
        to_light = await light.requests_total() - before[light.name]
        assert to_heavy + to_light == 60
        assert to_heavy * 4 < to_light, (to_heavy, to_light)
    finally:
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)


async def test_node_killed_under_load_costs_no_non_streaming_request(fleet):
    await fleet.setup({"r": []})
    sim = ("--ttft-ms", "30")
    doomed = fleet.start_node("doomed", "r", sim_args=sim)
    survivor = fleet.start_node("survivor", "r", sim_args=sim)
    client = await fleet.client("r")
    await fleet.wait_healthy("r", [doomed, survivor])

    async def kill_when_busy() -> None:
        deadline = time.monotonic() + WAIT_S
        while (await doomed.stats())["requests_running"] == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        doomed.sim.send_signal(signal.SIGKILL)  # mid-request, without warning

    killer = asyncio.create_task(kill_when_busy())
    results = await _send_many(client, fleet.model, 200, concurrency=8)
    await killer
    errors = [f"{type(r).__name__}: {getattr(r, 'status_code', '')} {getattr(r, 'body', r)}"
              for r in results if not isinstance(r, str)]
    assert errors == [], (errors, await fleet.envoy_stats("r"))
    # The agent reports the dead engine: Envoy stops considering the node at all.
    await fleet.wait_envoy("r", lambda h: h.get(doomed.address, {}).get("health_flags", "healthy") != "healthy",
                           "the killed node unhealthy")


async def test_spot_notice_stops_new_requests_to_the_node_while_in_flight_streams_finish(fleet):
    await fleet.setup({"r": []})
    noticed = asyncio.Event()

    async def instance_action(_request: web.Request) -> web.Response:
        if not noticed.is_set():
            return web.Response(status=404)
        return web.json_response({"action": "terminate", "time": "2026-11-27T21:00:00Z"})

    app = web.Application()
    app.router.add_get("/latest/meta-data/spot/instance-action", instance_action)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        sim = ("--tokens-per-sec", "20")
        spot = fleet.start_node("spot", "r", sim_args=sim, agent_args=(
            "--spot", "--aws-spot-url", f"http://127.0.0.1:{port}/latest/meta-data/spot/instance-action"))
        steady = fleet.start_node("steady", "r", sim_args=sim)
        client = await fleet.client("r")
        await fleet.wait_healthy("r", [spot, steady])

        async def stream() -> str:
            chunks = await client.chat.completions.create(model=fleet.model, max_tokens=40, stream=True,
                                                          messages=[{"role": "user", "content": "long"}])
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

        streams = []
        deadline = time.monotonic() + WAIT_S
        while (await spot.stats())["requests_running"] == 0:  # until one stream runs on the spot node
            assert time.monotonic() < deadline, "no stream reached the spot node"
            streams.append(asyncio.create_task(stream()))
            await asyncio.sleep(0.1)

        noticed.set()
        took = await fleet.wait_envoy("r", lambda h: "draining" in h.get(spot.address, {}).get("health_flags", ""),
                                      "the spot node draining")
        print(f"spot notice -> Envoy stops new requests to the node: {took:.3f} s (agent polls every 0.1 s)")
        before = await spot.requests_total()
        results = await _send_many(client, fleet.model, 20, concurrency=4)
        assert all(isinstance(r, str) for r in results)
        assert await spot.requests_total() == before  # nothing new on the draining node

        texts = await asyncio.gather(*streams)
        assert texts == [" ".join(f"tok{i}" for i in range(40))] * len(streams)  # every stream finished whole
        conn = await fleet.db()
        try:
            deadline = time.monotonic() + WAIT_S
            while await conn.fetchval("SELECT status FROM nodes WHERE name = $1", spot.name) != "dead":
                assert time.monotonic() < deadline, "the drained spot node was never retired"
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
    finally:
        await runner.cleanup()


async def test_whole_region_down_sends_traffic_to_the_fallback_region(fleet):
    await fleet.setup({"home": ["away"], "away": []})
    homes = [fleet.start_node(f"home{i}", "home") for i in (1, 2)]
    away = fleet.start_node("away", "away")
    client = await fleet.client("home")
    await fleet.wait_healthy("home", [*homes, away])

    results = await _send_many(client, fleet.model, 10, concurrency=2)
    assert all(isinstance(r, str) for r in results)
    assert await away.requests_total() == 0  # strict preference for the home region while it is up

    for node in homes:
        node.sim.send_signal(signal.SIGKILL)
    await fleet.wait_envoy("home", lambda h: all(h.get(n.address, {}).get("health_flags") != "healthy" for n in homes),
                           "the home region down")
    results = await _send_many(client, fleet.model, 10, concurrency=2)
    assert all(isinstance(r, str) for r in results), results
    assert await away.requests_total() == 10


async def test_policy_edit_goes_live_and_a_bad_policy_never_reaches_envoy(fleet):
    await fleet.setup({"home": ["away"], "away": []})
    home = fleet.region("home")
    conn = await fleet.db()
    try:
        await conn.execute("INSERT INTO routing_policy (region, pinning) VALUES ($1, 'strict')", home)
        away = fleet.start_node("away", "away")
        client = await fleet.client("home")
        await fleet.wait_healthy("away", [away])

        async def served() -> bool:
            try:
                await chat(client, fleet.model)
                return True
            except openai.InternalServerError as exc:
                # 503 model_unavailable: no pool in the pinned region; service_unavailable: a new cluster
                # whose endpoints Envoy is still warming up (a moment during the switch).
                assert exc.status_code == 503 and exc.body["code"] in ("model_unavailable", "service_unavailable")
                return False

        async def wait_served(expected: bool) -> float:
            started = time.monotonic()
            while await served() != expected:
                assert time.monotonic() - started < WAIT_S, f"policy not applied (expected served={expected})"
                await asyncio.sleep(0.02)
            return time.monotonic() - started

        await wait_served(False)  # strictly pinned to a region without nodes
        await conn.execute("UPDATE routing_policy SET pinning = 'fallback' WHERE region = $1", home)
        print(f"policy edit -> served through the fallback region: {await wait_served(True):.3f} s")

        # A bad edit (strict pinning with 99 retries) is rejected as a whole: strict never reaches Envoy.
        await conn.execute("UPDATE routing_policy SET pinning = 'strict', retries = 99 WHERE region = $1", home)
        deadline = time.monotonic() + WAIT_S
        while True:
            status = await conn.fetchrow("SELECT accepted, message FROM routing_policy_status")
            if status and not status["accepted"]:
                break
            assert time.monotonic() < deadline, "the bad policy was not rejected"
            await asyncio.sleep(0.02)
        assert f"routing_policy[{home}]: retries must be 0..10, not 99" in status["message"]
        assert all([await served() for _ in range(5)])

        await conn.execute("UPDATE routing_policy SET retries = 2 WHERE region = $1", home)  # now valid: strict
        await wait_served(False)
        assert (await conn.fetchrow("SELECT accepted FROM routing_policy_status"))["accepted"]
    finally:
        await conn.execute("DELETE FROM routing_policy WHERE region = $1", home)
        await conn.close()


async def test_node_without_a_valid_certificate_cannot_register(fleet, tmp_path):
    await fleet.setup({"r": []})
    address = fleet.gateway["nodeagent_address"]
    request = pb.RegisterNodeRequest(name=f"rogue-{fleet.tag}", region=fleet.region("r"), cloud="aws",
                                     models=[fleet.model], endpoint_host="127.0.0.1", endpoint_port=9)
    ours = (Path(fleet.gateway["pki_dir"]) / pki.CA_CERT).read_bytes()
    rogue = pki.issue_node(pki.create_ca("rogue CA"), request.name, "pool:aws")
    for creds in (grpc.ssl_channel_credentials(ours),  # no client certificate
                  grpc.ssl_channel_credentials(ours, rogue.key_pem, rogue.cert_pem)):  # another CA's
        async with grpc.aio.secure_channel(address, creds) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.NodeAgentStub(channel).RegisterNode(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails

    # A valid certificate for the gcp pool cannot register an aws node: the agent is told so and exits.
    tls = tmp_path / "gcp-cert"
    pki.write(tls, "node", pki.issue_node(pki.load_ca(Path(fleet.gateway["pki_dir"])), request.name, "pool:gcp"))
    (tls / "ca.pem").write_bytes(ours)
    agent = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "crosslogic", "agent", "--control-plane", address, "--name", request.name,
         "--region", fleet.region("r"), "--model", fleet.model, "--advertise", "127.0.0.1:9", "--engine-url",
         fleet.gateway["demo_nodes"][0]["url"], "--cloud", "aws", "--tls-dir", str(tls)],
        capture_output=True, text=True, timeout=60)
    assert agent.returncode == 2
    assert "certificate scope pool:gcp may not register a node with cloud 'aws'" in agent.stderr
    conn = await fleet.db()
    try:
        assert await conn.fetchval("SELECT count(*) FROM nodes WHERE name = $1", request.name) == 0
    finally:
        await conn.close()


async def test_model_upgrade_drains_old_version_nodes_without_a_failed_request(fleet):
    await fleet.setup({"r": []})
    old = [fleet.start_node(f"v1-{i}", "r", agent_args=("--model-version", "v1")) for i in (1, 2)]
    client = await fleet.client("r")
    await fleet.wait_healthy("r", old)

    stop = asyncio.Event()
    outcomes: list[object] = []

    async def traffic() -> None:
        while not stop.is_set():
            outcomes.extend(await _send_many(client, fleet.model, 8, concurrency=4))

    load = asyncio.create_task(traffic())
    new = [fleet.start_node(f"v2-{i}", "r", agent_args=("--model-version", "v2")) for i in (1, 2)]
    await fleet.wait_healthy("r", new)
    upgrade = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "crosslogic", "--state-dir", fleet.gateway["state_dir"], "upgrade",
                         "--model", fleet.model, "--version", "v2"], capture_output=True, text=True, timeout=60)
    assert upgrade.returncode == 0 and "draining 2 node(s)" in upgrade.stdout, upgrade.stderr
    await fleet.wait_envoy("r", lambda h: all("draining" in h.get(n.address, {}).get("health_flags", "") for n in old),
                           "the old version draining")
    served_by_old = sum([await n.requests_total() for n in old])
    for node in old:  # operators then stop the old machines: the agent drains and retires the node
        node.agent.send_signal(signal.SIGTERM)
    for node in old:
        assert await asyncio.to_thread(node.agent.wait, WAIT_S) == 0
    assert sum([await n.requests_total() for n in old]) == served_by_old  # nothing new reached them
    for node in old:
        node.sim.send_signal(signal.SIGKILL)
    after_kill = len(outcomes) + 16
    while len(outcomes) < after_kill:  # traffic keeps flowing while the old machines disappear  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    stop.set()
    await load
    assert outcomes and all(isinstance(o, str) for o in outcomes), [o for o in outcomes if not isinstance(o, str)]
    conn = await fleet.db()
    try:
        statuses = {r["name"]: r["status"] for r in await conn.fetch(
            "SELECT name, status FROM nodes WHERE $1 = ANY (model_list)", fleet.model)}
    finally:
        await conn.close()
    assert statuses == {**{n.name: "dead" for n in old}, **{n.name: "active" for n in new}}


async def test_reserved_lane_serves_only_its_org_and_spills_to_the_shared_pool_when_down(fleet):
    await fleet.setup({"r": []})
    org_id, dedicated_client = await fleet.tenant("r", "dedicated")
    shared_client = await fleet.client("r", "other")
    shared = fleet.start_node("shared", "r")
    reserved = fleet.start_node("reserved", "r", scope=f"org:{org_id}", cloud="onprem",
                                agent_args=("--reserved-org", org_id))
    await fleet.wait_healthy("r", [shared])
    lane = f"{fleet.cluster('r')}@{org_id}"

    async def totals() -> tuple[int, int]:
        return await reserved.requests_total(), await shared.requests_total()

    async def lane_serves_org() -> bool:
        before = await totals()
        try:
            await chat(dedicated_client, fleet.model)
        except openai.APIError:
            return False
        return (await totals())[0] == before[0] + 1

    deadline = time.monotonic() + WAIT_S
    while not await lane_serves_org():  # Envoy got the lane and authz learnt the org has one
        assert time.monotonic() < deadline, f"the reserved lane {lane} never served its org\n{fleet.logs()}"
        await asyncio.sleep(0.1)

    before = await totals()
    assert all(isinstance(r, str) for r in await _send_many(dedicated_client, fleet.model, 10, concurrency=2))
    assert all(isinstance(r, str) for r in await _send_many(shared_client, fleet.model, 10, concurrency=2))
    after = await totals()
    assert (after[0] - before[0], after[1] - before[1]) == (10, 10)  # nobody else reaches the dedicated node

    reserved.agent.send_signal(signal.SIGTERM)  # the dedicated node drains away: the org spills to the pool
    assert await asyncio.to_thread(reserved.agent.wait, WAIT_S) == 0
    before = await totals()
    results = await _send_many(dedicated_client, fleet.model, 10, concurrency=2)
    assert all(isinstance(r, str) for r in results), results
    after = await totals()
    assert (after[0] - before[0], after[1] - before[1]) == (0, 10)


async def test_failover_throttle_lets_only_the_spill_share_through_to_the_fallback_region(fleet):
    await fleet.setup({"home": ["away"], "away": []})
    conn = await fleet.db()
    try:
        await conn.execute("INSERT INTO routing_policy (region, spill_share) VALUES ($1, 0.2)", fleet.region("home"))
    finally:
        await conn.close()
    home = fleet.start_node("home", "home")
    away = fleet.start_node("away", "away")
    client = await fleet.client("home")
    await fleet.wait_healthy("home", [home, away])
    assert all(isinstance(r, str) for r in await _send_many(client, fleet.model, 10, concurrency=2))
    assert await away.requests_total() == 0

    home.sim.send_signal(signal.SIGKILL)
    await fleet.wait_envoy("home", lambda h: h.get(home.address, {}).get("health_flags") != "healthy",
                           "the region down")
    results = await _send_many(client, fleet.model, 100, concurrency=4)
    refused = [r for r in results if not isinstance(r, str)]
    assert all(isinstance(r, openai.InternalServerError) and r.body["code"] == "service_unavailable"
               for r in refused)
    spilled = await away.requests_total()
    assert spilled == 100 - len(refused)
    assert 5 <= spilled <= 45, spilled  # 20 % expected; binomial(100, 0.2) stays in [5, 45] but 1 run in 10^5


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_agent_restarts_a_crashed_engine_and_the_node_comes_back(fleet):
    await fleet.setup({"r": []})
    node = fleet.start_node("supervised", "r", supervised=True, agent_args=("--restart-backoff", "0.2"))
    client = await fleet.client("r")
    await fleet.wait_healthy("r", [node])
    assert isinstance(await chat(client, fleet.model), str)

    children = _children(node.agent.pid)
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)  # the engine crashes
    deadline = time.monotonic() + WAIT_S
    while _children(node.agent.pid) in ([], children):  # noqa: ASYNC110 - polling another process
        assert time.monotonic() < deadline, "the agent never restarted its engine"
        await asyncio.sleep(0.05)
    restarted = _children(node.agent.pid)
    await fleet.wait_healthy("r", [node])  # reported healthy again (it may never have looked unhealthy: fast)
    deadline = time.monotonic() + WAIT_S
    while True:  # the new engine answers through the gateway (it needs a moment to listen)
        try:
            assert isinstance(await chat(client, fleet.model), str)
            break
        except openai.APIError:
            assert time.monotonic() < deadline, "the restarted engine never served"
            await asyncio.sleep(0.1)
    children = restarted

    node.agent.send_signal(signal.SIGTERM)  # stopping the agent drains and stops its engine too
    assert await asyncio.to_thread(node.agent.wait, WAIT_S) == 0
    assert not _alive(int(children[0]))


async def test_latency_spike_degrades_a_node_so_traffic_prefers_the_others(fleet):
    await fleet.setup({"r": []})
    sick = fleet.start_node("sick", "r", sim_args=("--ttft-ms", "5"))
    well = fleet.start_node("well", "r", sim_args=("--ttft-ms", "5"))
    client = await fleet.client("r")
    await fleet.wait_healthy("r", [sick, well])
    conn = await fleet.db()
    try:
        deadline = time.monotonic() + WAIT_S
        while await conn.fetchval(  # both nodes have a TTFT baseline (agents report every 0.5 s)
                "SELECT count(*) FROM node_load l JOIN nodes n USING (node_id) "
                "WHERE n.name = ANY($1::text[]) AND l.ttft_baseline_s IS NOT NULL", [sick.name, well.name]) < 2:
            assert time.monotonic() < deadline, "no TTFT baseline"
            await _send_many(client, fleet.model, 8, concurrency=4)
    finally:
        await conn.close()

    async with aiohttp.ClientSession() as session:  # the node slows down 100x
        async with session.post(f"{sick.url}/sim/config", json={"ttft_ms": 500}) as response:
            assert response.status == 200

    async def degraded(hosts) -> bool:
        return "degraded" in hosts.get(sick.address, {}).get("health_flags", "")

    deadline = time.monotonic() + WAIT_S
    while not await degraded(await fleet.envoy_hosts("r")):  # keep traffic flowing so the spike is measured
        assert time.monotonic() < deadline, f"the slow node was never degraded\n{fleet.logs()}"
        results = await _send_many(client, fleet.model, 4, concurrency=4)
        assert all(isinstance(r, str) for r in results)
    before = await sick.requests_total()
    results = await _send_many(client, fleet.model, 20, concurrency=4)
    assert all(isinstance(r, str) for r in results)
    assert await sick.requests_total() == before  # a degraded host is used only if the healthy ones are not enough
