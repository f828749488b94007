"""Limiter throughput against one Valkey, and the latency the limiter adds through Envoy.

    .venv/bin/python bench/limiter.py [--seconds 5] [--processes 2] [--concurrency 64] [--requests 300]

1. Decisions/s: `processes` client processes, each `concurrency` coroutines in a closed loop, admit requests
   for 1,000 tenants with limits at all four layers (org, env, key, global: one EVALSHA on one Valkey; the
   limiter's auto-pipelining batches concurrent calls), against one embedded Valkey (AOF on, as
   `crosslogic up` runs it). Also: the same with split scopes (Redis Cluster: tenant and platform are two
   calls); four layers pipelined 32 per round trip from one process; Valkey's capacity with pre-encoded
   commands on two connections (Valkey never waits for the client, which costs almost nothing): the
   goal's number; Valkey's script time (INFO commandstats) and process CPU per decision. Every phase starts
   from an empty Valkey.
2. Latency through Envoy: `crosslogic up --demo` in both admission modes vs a router-only Envoy to the same
   simulated nodes, sequential requests, same run; plus a bare ShouldRateLimit round trip.
Only ratios are comparable across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_overhead import start_plain_envoy, start_stack  # noqa: E402
from crosslogic.ratelimit import admission  # noqa: E402
from crosslogic.ratelimit.engine import Limiter  # noqa: E402
from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits  # noqa: E402
from crosslogic.runtime.processes import free_port  # noqa: E402
from crosslogic.runtime.valkey import EmbeddedValkey  # noqa: E402

TENANT = TenantLimits(LayerLimits(tokens_per_min=10**9, requests_per_min=10**8),
                      LayerLimits(tokens_per_min=10**9, requests_per_min=10**8),
                      LayerLimits(tokens_per_min=10**9, requests_per_min=10**8, concurrency=10**6))
PLATFORM_4 = PlatformLimits(global_=LayerLimits(tokens_per_min=10**12))
PLATFORM_3 = PlatformLimits()


def _decide_worker(url: str, seconds: float, concurrency: int, four_layers: bool, split: bool, out) -> None:
    import redis.asyncio as aioredis

    async def main() -> int:
        redis = aioredis.from_url(url, max_connections=concurrency)
        limiter = Limiter(redis, reservation_ttl_ms=5_000, split_scopes=split)
        tenants = [(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(1000)]
        platform = PLATFORM_4 if four_layers else PLATFORM_3
        done = 0
        deadline = time.perf_counter() + seconds

        async def loop(i: int) -> None:
            nonlocal done
            n = i
            while time.perf_counter() < deadline:
                org, env, key = tenants[n % len(tenants)]
                await admission.admit(limiter, org, env, key, "ap-south", uuid.uuid4().hex, 300, TENANT, platform)
                done += 1
                n += 7

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        await redis.aclose()
        return done

    out.put(asyncio.run(main()))


def _pipelined_worker(url: str, seconds: float, batch: int, out) -> None:
    """Four-layer reservations sent `batch` per round trip: what an auto-batching limiter would send."""
    import redis.asyncio as aioredis

    async def main() -> int:
        redis = aioredis.from_url(url)
        limiter = Limiter(redis, reservation_ttl_ms=5_000)
        sha = await redis.script_load(limiter.reserve_command(_stages("a", "b", "c", True), "x", 1)[0])
        tenants = [(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(1000)]
        done, n = 0, 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            pipe = redis.pipeline(transaction=False)
            for _ in range(batch):
                org, env, key = tenants[n % len(tenants)]
                n += 7
                _, keys, args = limiter.reserve_command(_stages(org, env, key, True), uuid.uuid4().hex, 300)
                pipe.evalsha(sha, len(keys), *keys, *args)
            await pipe.execute()
            done += batch
        await redis.aclose()
        return done

    out.put(asyncio.run(main()))


def _stages(org: str, env: str, key: str, four_layers: bool) -> list:
    plan = admission.stages(org, env, key, "ap-south", TENANT, PLATFORM_4 if four_layers else PLATFORM_3)
    return plan if four_layers else plan[:1]


def _resp(*parts) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _raw_worker(url: str, seconds: float, four_layers: bool, out) -> None:
    """Valkey's own capacity: pre-encoded EVALSHA commands written 256 per round trip on raw sockets
    (hiredis parses the replies), so the Python client adds almost nothing. Reservations live 1 ms, so
    the 4,096 prepared request ids can be cycled and every call is a full, fresh decision."""
    import socket

    import hiredis
    import redis as sync_redis

    host, port = url.split("//")[1].split("/")[0].split(":")
    client = sync_redis.Redis(host=host, port=int(port))
    limiter = Limiter(client, reservation_ttl_ms=1, lease_ttl_ms=1)  # only used to build commands
    sha = client.script_load(limiter.reserve_command(_stages("a", "b", "c", True), "x", 1)[0])
    tenants = [(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(1000)]
    commands = []
    for i in range(4096):
        org, env, key = tenants[i % len(tenants)]
        _, keys, args = limiter.reserve_command(_stages(org, env, key, four_layers), uuid.uuid4().hex, 300)
        commands.append(_resp("EVALSHA", sha, len(keys), *keys, *args))
    batches = [b"".join(commands[i:i + 256]) for i in range(0, len(commands), 256)]
    # Two connections, one batch always queued in Valkey while the other's replies are read: Valkey never
    # waits for this client, so the number is Valkey's (its single thread) and not the ping-pong's.
    links = [(socket.create_connection((host, int(port))), hiredis.Reader()) for _ in range(2)]
    n = 0

    def send(sock: socket.socket) -> None:
        nonlocal n
        sock.sendall(batches[n % len(batches)])
        n += 1

    def receive(sock: socket.socket, reader) -> None:
        expected = 256
        while expected:
            reader.feed(sock.recv(1 << 20))
            while expected and (reply := reader.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(reply)
                expected -= 1

    for sock, _ in links:
        send(sock)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for sock, reader in links:
            receive(sock, reader)
            done += 256
            send(sock)
    for sock, reader in links:
        receive(sock, reader)
        sock.close()
    out.put(done)


def decisions_per_second(url: str, seconds: float, processes: int, concurrency: int, four_layers: bool,
                         pipelined: bool = False, raw: bool = False, split: bool = False) -> tuple[float, int]:
    """(decisions per second, decisions made)."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    target, extra = ((_raw_worker, (four_layers,)) if raw else (_pipelined_worker, (32,)) if pipelined
                     else (_decide_worker, (concurrency, four_layers, split)))
    workers = [multiprocessing.Process(target=target, args=(url, seconds, *extra, queue))
               for _ in range(processes)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    total = sum(queue.get() for _ in workers)
    for w in workers:
        w.join()
    return total / (time.perf_counter() - start), total


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fresh_valkey(url: str) -> None:
    """Every phase starts from an empty Valkey with zeroed statistics: reservations a phase leaves behind
    (never settled here) would otherwise slow the next one down."""
    import redis.asyncio as aioredis

    redis = aioredis.from_url(url)
    await redis.flushall()
    await redis.config_resetstat()
    await redis.aclose()


async def script_usec_per_call(url: str) -> float:
    import redis.asyncio as aioredis

    redis = aioredis.from_url(url)
    stats = await redis.info("commandstats")
    await redis.aclose()
    evalsha = stats.get("cmdstat_evalsha", {})
    return float(evalsha.get("usec_per_call", float("nan")))

async def sequential_latency_ms(url: str, api_key: str, requests: int) -> list[float]:
    import aiohttp

    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"authorization": f"Bearer {api_key}"}
    out = []
    async with aiohttp.ClientSession() as http:
        for i in range(requests + 20):
            start = time.perf_counter()
            async with http.post(url, json=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")
            if i >= 20:  # warm-up
                out.append((time.perf_counter() - start) * 1000)
    return out


async def rls_round_trip_ms(port: int, requests: int, info: dict) -> list[float]:
    import grpc
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        out = []
        for i in range(requests + 20):
            entries = {"org_id": info["org_id"], "env_id": info["env_id"], "key_id": info["key_id"],
                       "reserve": "10", "region": "ap-south", "request_id": uuid.uuid4().hex}
            request = rls_pb2.RateLimitRequest(domain="crosslogic", descriptors=[ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()])])
            start = time.perf_counter()
            await stub.ShouldRateLimit(request)
            if i >= 20:
                out.append((time.perf_counter() - start) * 1000)
        return out


def through_envoy(state: Path, requests: int) -> dict[str, float]:
    """Sequential p50 through plain Envoy and through the gateway in both admission modes: "authz" (the
    default: the reservation inside the ext_authz call) and "rls" (Envoy's rate-limit filter calling
    `serve ratelimit`), whose own round trip is measured too."""
    out: dict[str, float] = {}
    for mode in ("authz", "rls"):
        stack_state = state / mode
        stack_state.mkdir(parents=True, exist_ok=True)
        up, info = start_stack(stack_state, free_port(), env={**os.environ, "CROSSLOGIC_ADMISSION": mode})
        plain = None
        try:
            if mode == "authz":
                chat_nodes = [n["url"] for n in info["demo_nodes"] if n["model"] == "llama-3-8b"]
                plain, port = start_plain_envoy(stack_state, chat_nodes)
                out["router_only_p50_ms"] = statistics.median(asyncio.run(sequential_latency_ms(
                    f"http://127.0.0.1:{port}/v1/chat/completions", info["api_key"], requests)))
            out[f"gateway_{mode}_p50_ms"] = statistics.median(asyncio.run(sequential_latency_ms(
                f"{info['gateway_url']}/chat/completions", info["api_key"], requests)))
            if mode == "rls":
                out["rls_round_trip_p50_ms"] = statistics.median(
                    asyncio.run(rls_round_trip_ms(info["ports"]["ratelimit"], requests, info)))
        finally:
            for proc in (plain, up):
                if proc is not None:
                    proc.terminate()
                    proc.wait(60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--skip-envoy", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedValkey(Path(tmp) / "valkey").start()
        try:
            def phase(*params, **options) -> tuple[float, int]:
                asyncio.run(fresh_valkey(valkey.url))
                return decisions_per_second(valkey.url, args.seconds, *params, **options)

            split, _ = phase(args.processes, args.concurrency, True, split=True)
            four, _ = phase(args.processes, args.concurrency, True)
            usec = asyncio.run(script_usec_per_call(valkey.url))
            three, _ = phase(args.processes, args.concurrency, False)
            piped, _ = phase(1, 0, True, pipelined=True)
            raw3, _ = phase(1, 0, False, raw=True)
            asyncio.run(fresh_valkey(valkey.url))
            cpu_before = process_cpu_s(valkey.child.proc.pid)
            raw4, made = decisions_per_second(valkey.url, args.seconds, 1, 0, True, raw=True)
            raw4_cpu_us = (process_cpu_s(valkey.child.proc.pid) - cpu_before) / made * 1e6
        finally:
            valkey.stop()
        print(f"decisions/s, four layers (org+env+key+global, 1 EVALSHA):     {four:10.0f}")
        print(f"decisions/s, four layers, split scopes (Cluster, 2 EVALSHA):  {split:10.0f}")
        print(f"decisions/s, tenant scope only (org+env+key):                 {three:10.0f}")
        print(f"decisions/s, four layers, pipelined 32 per round trip:        {piped:10.0f}")
        print(f"Valkey capacity (pre-encoded, 256 per round trip), four layers:  {raw4:10.0f} decisions/s")
        print(f"Valkey capacity (pre-encoded, 256 per round trip), tenant scope: {raw3:10.0f} decisions/s")
        print(f"Valkey script time per four-layer EVALSHA (INFO commandstats): {usec:.1f} us")
        print(f"Valkey process CPU per four-layer decision (script, I/O, AOF) while saturated: {raw4_cpu_us:.1f} us "
              f"-> one Valkey core serves ~{1e6 / raw4_cpu_us:,.0f} four-layer decisions/s")
        if not args.skip_envoy:
            lat = through_envoy(Path(tmp), args.requests)
            base = lat["router_only_p50_ms"]
            print(f"p50 latency, router-only Envoy:  {base:.2f} ms")
            for mode, what in (("authz", "reservation inside ext_authz (default)"),
                               ("rls", "ext_authz, then Envoy's rate-limit filter")):
                p50 = lat[f"gateway_{mode}_p50_ms"]
                print(f"p50 latency, full gateway, {mode:<5}: {p50:.2f} ms (+{p50 - base:.2f} ms, x{p50 / base:.2f}; "
                      f"{what}, Lua, ALS)")
            print("p50 ShouldRateLimit round trip (gRPC, Python service, Valkey): "
                  f"{lat['rls_round_trip_p50_ms']:.2f} ms")


if __name__ == "__main__":
    main()
