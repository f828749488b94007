"""`crosslogic agent`: warms the engine up and measures it, registers the node, heartbeats, reports the engine's
load (vLLM or SGLang), watches for spot notices, cleans old model files off the disk, supervises the engine, and
drains on SIGTERM (no new requests; in-flight ones finish; then dead).

Left out of seed §24.1/§45 on purpose: model loading from object storage (the engine command does it: vLLM and
SGLang download weights themselves, and a SkyPilot task's setup can mount a bucket), agent self-upgrade (the
machine image / SkyPilot setup pins the agent version; a new version is a new node, drained in like a model
upgrade), log streaming (the platform's log shipper reads the agent's JSON lines, `--json`), GPU temperature and
VRAM fragmentation (need NVML on a GPU; nothing to read here)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from crosslogic.agent import observe, spot
from crosslogic.agent.disk import clean_model_dir
from crosslogic.agent.engine import Backoff, Engine
from crosslogic.agent.metrics import EngineSample, mean_ttft, parse_engine_metrics, tokens_per_sec
from crosslogic.agent.proto import nodeagent_pb2 as pb
from crosslogic.agent.proto import nodeagent_pb2_grpc as pb_grpc
from crosslogic.agent.warmup import benchmark
from crosslogic.runtime.ops_http import ops_server

log = logging.getLogger("crosslogic.agent")


@dataclass(frozen=True)
class AgentConfig:
    control_plane: str  # host:port of the NodeAgent API
    registration: pb.RegisterNodeRequest
    engine_url: str  # where vLLM answers /metrics and /health
    engine_argv: tuple[str, ...] = ()  # empty: the engine is started by someone else
    heartbeat_interval_s: float | None = None  # None: what the control plane says at registration
    metrics_interval_s: float | None = None
    spot_interval_s: float = 5.0
    spot_urls: tuple[str | None, str | None, str | None] = (None, None, None)  # aws, gcp, azure
    drain_timeout_s: float = 300.0
    tls_dir: Path | None = None  # ca.pem + node.pem + node.key
    backoff: Backoff = field(default_factory=Backoff)
    warmup_requests: int = 4  # concurrent decode requests of the warm-up benchmark; 0 = no warm-up
    warmup_decode_tokens: int = 32
    model_dir: Path | None = None  # disk cleanup: old models' files here are removed
    cleanup_interval_s: float = 3600.0
    cleanup_min_age_s: float = 3600.0
    metrics_port: int = 0  # /metrics, /healthz, /readyz of the agent (agent/observe.py); 0 = none
    metrics_host: str = "127.0.0.1"


def channel(config: AgentConfig) -> grpc.aio.Channel:
    if config.tls_dir is None:
        return grpc.aio.insecure_channel(config.control_plane)
    creds = grpc.ssl_channel_credentials(
        root_certificates=(config.tls_dir / "ca.pem").read_bytes(),
        private_key=(config.tls_dir / "node.key").read_bytes(),
        certificate_chain=(config.tls_dir / "node.pem").read_bytes())
    return grpc.aio.secure_channel(config.control_plane, creds)


class RegistrationRefused(Exception):
    pass


class Agent:
    def __init__(self, config: AgentConfig, stub: pb_grpc.NodeAgentStub, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.stub = stub
        self.session = session
        self.node_id = ""
        self.heartbeat_s = config.heartbeat_interval_s or 5.0
        self.metrics_s = config.metrics_interval_s or 15.0
        self.last_sample: EngineSample | None = None
        self.evicted = asyncio.Event()
        self.registration = config.registration  # completed by prepare()
        self.health = observe.AgentHealth()

    async def register(self) -> None:
        try:
            answer = await self.stub.RegisterNode(self.registration, timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
                raise RegistrationRefused(exc.details()) from None
            raise
        self.node_id = answer.node_id
        self.heartbeat_s = self.config.heartbeat_interval_s or answer.heartbeat_interval_ms / 1000
        self.metrics_s = self.config.metrics_interval_s or answer.metrics_interval_ms / 1000
        self.health.registered(self.node_id, self.heartbeat_s)
        log.info("registered as %s (heartbeat %.1f s, metrics %.1f s)", self.node_id, self.heartbeat_s, self.metrics_s)

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            healthy = await engine_healthy(self.session, self.config.engine_url)
            observe.engine_up.set(1 if healthy else 0)
            try:
                await self.stub.SendHeartbeat(pb.HeartbeatRequest(node_id=self.node_id, engine_unhealthy=not healthy),
                                              timeout=5)
                self.health.heartbeat(True)
            except grpc.aio.AioRpcError as exc:
                self.health.heartbeat(False)
                if exc.code() == grpc.StatusCode.NOT_FOUND and not self.evicted.is_set():
                    log.warning("control plane forgot this node; registering again")
                    await self.register()
                else:
                    log.warning("heartbeat failed: %s", exc.details())

    async def scrape(self) -> EngineSample | None:
        try:
            async with self.session.get(f"{self.config.engine_url}/metrics",
                                        timeout=aiohttp.ClientTimeout(total=5)) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot scrape the engine: %s", exc)
            return None
        return parse_engine_metrics(text, time.monotonic())

    async def prepare(self) -> None:
        """Before registering: which engine answers (from its metrics), and the warm-up benchmark, whose decode
        rate is the capacity reported (unless the operator gave one with --tokens-per-sec)."""
        request = pb.RegisterNodeRequest()
        request.CopyFrom(self.config.registration)
        sample = await self.scrape()
        if sample is not None and not request.engine:
            request.engine = sample.engine
        if self.config.warmup_requests > 0:
            try:
                result = await benchmark(self.session, self.config.engine_url, request.models[0],
                                         concurrency=self.config.warmup_requests,
                                         decode_tokens=self.config.warmup_decode_tokens)
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                log.warning("warm-up benchmark failed (%s); registering without a measured capacity", exc)
            else:
                log.info("warm-up: prefill %d tokens/s, decode %d tokens/s", result.prefill_tokens_per_sec,
                         result.decode_tokens_per_sec)
                request.prefill_tokens_per_sec = result.prefill_tokens_per_sec
                observe.warmup_decode.set(result.decode_tokens_per_sec)
                if not request.throughput_tokens_per_sec:
                    request.throughput_tokens_per_sec = result.decode_tokens_per_sec
        self.registration = request

    async def clean_disk(self) -> None:
        models = list(self.config.registration.models)
        while self.config.model_dir is not None:
            removed = await asyncio.to_thread(clean_model_dir, self.config.model_dir, models,
                                              self.config.cleanup_min_age_s)
            if removed:
                log.info("disk cleanup removed %d old model entr%s", len(removed), "y" if len(removed) == 1 else "ies")
            await asyncio.sleep(self.config.cleanup_interval_s)

    async def metrics(self) -> None:
        while True:
            sample = await self.scrape()
            if sample is not None:
                rate = tokens_per_sec(self.last_sample, sample)
                ttft = mean_ttft(self.last_sample, sample)
                self.last_sample = sample
                try:
                    await self.stub.SendMetrics(pb.MetricsRequest(
                        node_id=self.node_id, requests_running=sample.requests_running,
                        requests_waiting=sample.requests_waiting, kv_cache_usage=sample.kv_cache_usage,
                        generation_tokens_per_sec=rate, mean_ttft_s=ttft), timeout=5)
                    observe.reports.labels("metrics", "ok").inc()
                except grpc.aio.AioRpcError as exc:
                    observe.reports.labels("metrics", "failed").inc()
                    log.warning("metrics report failed: %s", exc.details())
            await asyncio.sleep(self.metrics_s)

    async def watch_spot(self) -> None:
        targets = spot.watches(*self.config.spot_urls)

        async def on_notice(notice: spot.SpotNotice) -> None:
            log.warning("spot notice from %s: %s; draining", notice.provider, notice.detail)
            observe.spot_notices.labels(notice.provider).inc()
            self.evicted.set()
            await self.stub.NotifySpotEviction(pb.SpotEvictionRequest(
                node_id=self.node_id, provider=notice.provider, detail=notice.detail), timeout=5)

        await spot.watch_for_notice(self.session, targets, self.config.spot_interval_s, on_notice)

    async def drain(self, reason: str) -> None:
        """No new requests (registry: draining), wait for the engine to go idle, then report the node dead."""
        await self.stub.Shutdown(pb.ShutdownRequest(node_id=self.node_id, reason=reason, final=False), timeout=5)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while time.monotonic() < deadline:
            sample = await self.scrape()
            if sample is not None and sample.requests_running + sample.requests_waiting == 0:
                break
            await asyncio.sleep(0.2)
        await self.stub.Shutdown(pb.ShutdownRequest(node_id=self.node_id, reason=reason, final=True), timeout=5)
        self.health.left()
        log.info("drained (%s)", reason)


async def run_agent(config: AgentConfig, stopping: asyncio.Event) -> None:
    """Runs until `stopping` is set (SIGTERM), then drains and stops the engine."""
    engine = Engine(list(config.engine_argv), config.backoff) if config.engine_argv else None
    started = time.monotonic()
    async with channel(config) as chan, aiohttp.ClientSession() as session:
        agent = Agent(config, pb_grpc.NodeAgentStub(chan), session)
        ready = agent.health.readiness(lambda: engine_healthy(session, config.engine_url))
        async with ops_server(config.metrics_port, "agent", ready, config.metrics_host):
            await _serve(agent, engine, stopping, started)


async def _serve(agent: Agent, engine: Engine | None, stopping: asyncio.Event, started: float) -> None:
    config, session = agent.config, agent.session
    tasks: list[asyncio.Task] = []
    if engine is not None:
        tasks.append(asyncio.create_task(engine.supervise()))
    try:
        await wait_engine_ready(session, config.engine_url, stopping)
        if stopping.is_set():
            return
        observe.engine_ready_seconds.set(time.monotonic() - started)
        await agent.prepare()
        if not await _register_with_retry(agent, stopping, config.backoff):
            return
        tasks += [asyncio.create_task(agent.heartbeats()), asyncio.create_task(agent.metrics()),
                  asyncio.create_task(agent.watch_spot()), asyncio.create_task(agent.clean_disk())]
        # A spot notice drains at once (the cloud takes the machine soon); SIGTERM drains too.
        await _first_of(stopping, agent.evicted)
        try:
            await agent.drain("agent stopped" if not agent.evicted.is_set() else "spot eviction")
        except grpc.aio.AioRpcError as exc:  # control plane unreachable: its heartbeat timeout takes over
            log.warning("could not report the drain: %s", exc.details())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if engine is not None:
            await engine.stop()


async def _register_with_retry(agent: Agent, stopping: asyncio.Event, backoff: Backoff) -> bool:
    """Keeps trying while the control plane is unreachable (it may be restarting); a refusal is final."""
    failures = 0
    while not stopping.is_set():
        try:
            await agent.register()
            return True
        except grpc.aio.AioRpcError as exc:
            failures += 1
            delay = backoff.delay(failures)
            log.warning("cannot register (%s: %s); retrying in %.1f s", exc.code().name, exc.details(), delay)
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except TimeoutError:
                pass
    return False


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def engine_healthy(session: aiohttp.ClientSession, engine_url: str) -> bool:
    try:
        async with session.get(f"{engine_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def wait_engine_ready(session: aiohttp.ClientSession, engine_url: str, stopping: asyncio.Event) -> None:
    """Registers only once the engine answers /health: Envoy must not get a node that cannot serve yet."""
    while not stopping.is_set():
        if await engine_healthy(session, engine_url):
            return
        try:
            await asyncio.wait_for(stopping.wait(), 0.5)
        except TimeoutError:
            pass
