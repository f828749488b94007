"""The autoscaler: one tick reads every managed pool, decides (crosslogic/fleet/decide.py), claims its actions in
Postgres under the pool's advisory lock, then asks the provider. Clock and provider are injected, so tests drive
ticks by hand and the bench compresses a day.

Provider calls happen after the claiming transaction has committed (a SkyPilot launch takes minutes: no lock is held
for it), as tasks this object owns; their outcome is written back and audited when they finish.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from crosslogic.fleet import store
from crosslogic.fleet.decide import (
    Decision,
    Drain,
    Launch,
    PoolMemory,
    Terminate,
    after_launch_failure,
    after_launch_success,
    decide,
    node_load,
)
from crosslogic.fleet.metrics import FleetMetrics
from crosslogic.fleet.policy import SQL_POLICIES, SQL_RECORD_STATUS, FleetPolicyRejected, PoolPolicy, validate
from crosslogic.fleet.provider import CapacityUnavailable, LaunchFailed, NodeSpec, Provider

log = logging.getLogger("crosslogic.fleet")


@dataclass(frozen=True)
class AutoscalerOptions:
    metrics_stale_s: float = 30.0  # node metrics older than this count as missing
    drain_grace_s: float = 2.0  # a scrape this long after a drain began must see the node idle before it goes
    replica: str = field(default_factory=lambda: f"fleet-{uuid.uuid4().hex[:8]}")


def machine_name(region: str, model: str) -> str:
    """Unique, and valid as a certificate name and a SkyPilot cluster name (lowercase, digits, dashes)."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{model}-{region}".lower()).strip("-")[:40].rstrip("-")
    return f"n-{slug}-{uuid.uuid4().hex[:8]}"


class Autoscaler:
    def __init__(self, pool: asyncpg.Pool, provider: Provider, options: AutoscalerOptions | None = None,
                 clock: Callable[[], float] = time.time, metrics: FleetMetrics | None = None) -> None:
        self.pool = pool
        self.provider = provider
        self.options = options or AutoscalerOptions()
        self.clock = clock
        self.metrics = metrics or FleetMetrics()
        self.policies: dict[tuple[str, str], PoolPolicy] = {}  # the last accepted policy of each pool
        self._statuses: dict[tuple[str, str], str] = {}
        self._tasks: set[asyncio.Task] = set()

    @property
    def actor(self) -> str:
        return f"fleet:{self.options.replica}"

    async def tick(self) -> list[Decision]:
        """One pass over every pool; returns the decisions this replica took (pools locked by another replica
        are skipped)."""
        async with self.pool.acquire() as conn:
            capacities = {r["model_id"]: float(r["tokens_per_sec"]) for r in await conn.fetch(store.SQL_MODELS)}
            rows = await conn.fetch(SQL_POLICIES)
            await self._accept_policies(conn, rows, capacities)
        decisions = []
        for key in sorted({(r["region"], r["model"]) for r in rows}):
            policy = self.policies.get(key)
            if policy is not None:
                decision = await self._tick_pool(policy, policy.node_tokens_per_sec or capacities.get(key[1], 0.0))
                if decision is not None:
                    decisions.append(decision)
        return decisions

    async def _accept_policies(self, conn: asyncpg.Connection, rows: list[asyncpg.Record],
                               capacities: dict[str, float]) -> None:
        present = set()
        for row in rows:
            key = (row["region"], row["model"])
            present.add(key)
            try:
                self.policies[key] = validate(row, capacities.get(row["model"], 0.0))
                accepted, message = True, "accepted"
            except FleetPolicyRejected as exc:
                accepted, message = False, f"rejected: {exc}"
                log.warning("fleet policy for %s/%s %s; keeping the last accepted one", *key, message)
            self.metrics.policy_rejected.labels(*key).set(0 if accepted else 1)
            if self._statuses.get(key) != message:
                await conn.execute(SQL_RECORD_STATUS, *key, accepted, message)
                self._statuses[key] = message
        for key in set(self.policies) - present:  # the row was deleted: the pool is no longer managed
            del self.policies[key]

    async def _tick_pool(self, policy: PoolPolicy, capacity_tps: float) -> Decision | None:
        region, model = policy.region, policy.model
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(store.SQL_TRY_LOCK, store.LOCK_CLASS, region, model):
                return None  # another replica is deciding for this pool right now
            now = self.clock()
            await conn.execute(store.SQL_MARK_RUNNING, region, model)
            rows = await conn.fetch(store.SQL_POOL_NODES, region, model, self.options.metrics_stale_s,
                                    self.options.drain_grace_s)
            nodes = [store.node_state(r, self._load(r, policy, capacity_tps)) for r in rows]
            replaced = frozenset(r["replaces"] for r in await conn.fetch(store.SQL_REPLACED, region, model))
            memory = store.memory_from(await conn.fetchrow(store.SQL_MEMORY, region, model))
            decision = decide(policy, capacity_tps, nodes, memory, now, replaced)
            launches, terminations = await self._claim(conn, policy, decision, now)
            await conn.execute(store.SQL_SAVE_MEMORY, region, model, *store.memory_args(decision.memory))
        self.metrics.observe(policy, decision, nodes)
        for spec, action in launches:
            self._spawn(self._launch(policy, spec, action))
        for name, reason in terminations:
            self._spawn(self._terminate(policy, name, reason))
        return decision

    def _load(self, row: asyncpg.Record, policy: PoolPolicy, capacity_tps: float) -> float | None:
        if row["status"] != "active" or not row["fresh"]:
            return None
        return node_load(row["requests_running"], row["requests_waiting"], row["kv_cache_usage"],
                         row["generation_tokens_per_sec"], float(row["throughput_tokens_per_sec"] or capacity_tps),
                         policy.queue_capacity)

    async def _claim(self, conn: asyncpg.Connection, policy: PoolPolicy, decision: Decision,
                     now: float) -> tuple[list[tuple[NodeSpec, Launch]], list[tuple[str, str]]]:
        launches, terminations = [], []
        details = {"desired": decision.desired, "load": round(decision.load, 3)}
        for action in decision.actions:
            if isinstance(action, Launch):
                spec = NodeSpec(name=machine_name(policy.region, policy.model), region=policy.region,
                                model=policy.model, cloud=policy.cloud, gpu_type=policy.gpu_type,
                                accelerators=policy.accelerators, spot=action.spot, engine=policy.engine,
                                cloud_region=policy.cloud_region)
                price = self.provider.price(spec)
                await conn.execute(store.SQL_CLAIM_MACHINE, spec.name, spec.region, spec.model, self.provider.name,
                                   spec.spot, spec.gpu_type, price, action.reason, action.replaces, self.actor, now)
                await conn.execute(store.SQL_CLAIM_NODE, spec.name, spec.region, spec.cloud, spec.spot, spec.gpu_type,
                                   spec.model, action.reason, price)
                launches.append((spec, action))
                await store.audit(conn, self.actor, "fleet.launch", spec.name, {
                    **details, "reason": action.reason, "spot": spec.spot, "replaces": action.replaces,
                    "price_microdollars_per_hour": price, "pool": f"{policy.region}/{policy.model}"})
            elif isinstance(action, Drain):
                if await conn.execute(store.SQL_DRAIN, action.name, action.reason) != "UPDATE 0":
                    await store.audit(conn, self.actor, "fleet.drain", action.name,
                                      {**details, "reason": action.reason})
            elif isinstance(action, Terminate):
                if await conn.fetchval(store.SQL_CLAIM_TERMINATE, action.name, action.reason) is not None:
                    terminations.append((action.name, action.reason))
                    await store.audit(conn, self.actor, "fleet.terminate", action.name,
                                      {**details, "reason": action.reason})
            self.metrics.decisions.labels(policy.region, policy.model, type(action).__name__.lower(),
                                          _reason_label(action.reason)).inc()
        return launches, terminations

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self, policy: PoolPolicy, spec: NodeSpec, action: Launch) -> None:
        started = time.monotonic()
        try:
            machine = await self.provider.launch(spec)
        except LaunchFailed as exc:
            capacity = isinstance(exc, CapacityUnavailable)
            log.warning("launch of %s failed (%s): %s", spec.name, "no capacity" if capacity else "error", exc)
            self.metrics.launch_failures.labels(policy.region, policy.model,
                                                "capacity" if capacity else "error").inc()
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(store.SQL_LOCK, store.LOCK_CLASS, policy.region, policy.model)
                await conn.execute(store.SQL_LAUNCH_FAILED, spec.name, str(exc)[:500])
                await conn.execute(store.SQL_TERMINATED_NODE, spec.name, f"launch failed: {str(exc)[:200]}")
                memory = store.memory_from(await conn.fetchrow(store.SQL_MEMORY, policy.region, policy.model))
                memory = after_launch_failure(policy, memory, self.clock(), spot=spec.spot,
                                              capacity_unavailable=capacity)
                await conn.execute(store.SQL_SAVE_MEMORY, policy.region, policy.model, *store.memory_args(memory))
                await store.audit(conn, self.actor, "fleet.launch_failed", spec.name,
                                  {"error": str(exc)[:500], "spot": spec.spot, "capacity_unavailable": capacity})
            return
        self.metrics.launch_seconds.labels(policy.region, policy.model).observe(time.monotonic() - started)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(store.SQL_LOCK, store.LOCK_CLASS, policy.region, policy.model)
            await conn.execute(store.SQL_LAUNCHED_MACHINE, spec.name, machine.machine_id,
                               machine.price_microdollars_per_hour)
            await conn.execute(store.SQL_LAUNCHED_NODE, spec.name, machine.price_microdollars_per_hour)
            memory = store.memory_from(await conn.fetchrow(store.SQL_MEMORY, policy.region, policy.model))
            await conn.execute(store.SQL_SAVE_MEMORY, policy.region, policy.model,
                               *store.memory_args(after_launch_success(memory)))

    async def _terminate(self, policy: PoolPolicy, name: str, reason: str) -> None:
        try:
            await self.provider.terminate(name)
        except Exception as exc:  # the provider's own error types vary: the claim goes stale and is retried
            log.warning("terminating %s failed: %s (retried later)", name, exc)
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(store.SQL_TERMINATED_MACHINE, name)
            await conn.execute(store.SQL_TERMINATED_NODE, name, reason)
        log.info("terminated %s (%s)", name, reason)

    async def settle(self, timeout_s: float = 60.0) -> None:
        """Waits for the provider calls under way (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def run(self, interval_s: float, stopping: asyncio.Event | None = None) -> None:
        stopping = stopping or asyncio.Event()
        while not stopping.is_set():
            try:
                await self.tick()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("fleet tick failed: %s", exc)
            try:
                await asyncio.wait_for(stopping.wait(), interval_s)
            except TimeoutError:
                pass


def _reason_label(reason: str) -> str:
    """A bounded label value: the reason's kind, not its node names or numbers."""
    for kind in ("spot eviction", "never registered", "below the floor", "above target", "scale down", "drained"):
        if kind in reason:
            return kind.replace(" ", "_")
    return "other"


__all__ = ["Autoscaler", "AutoscalerOptions", "PoolMemory", "machine_name"]
