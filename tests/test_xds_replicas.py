"""xDS replicas (`crosslogic up --replicas N`): every replica builds the same snapshot from the same Postgres
state, with the same content-hashed versions, so an Envoy that reconnects to another replica is sent nothing
new (no listener drain, no cluster re-warm)."""

from __future__ import annotations

import asyncpg

from crosslogic.settings import SchedulerSettings
from crosslogic.store.demo import seed_demo
from crosslogic.xds.cache import SnapshotCache
from crosslogic.xds.model import GatewaySettings
from crosslogic.xds.service import Scheduler
from crosslogic.xds.snapshot import PUSH_ORDER

NODES = [(f"node-{i}", "127.0.0.1", 9100 + i, ["llama-3-8b"]) for i in range(1, 5)]


def _replica(pool: asyncpg.Pool) -> tuple[Scheduler, SnapshotCache]:
    cache = SnapshotCache()
    gateway = GatewaySettings(listen_host="127.0.0.1", listen_port=8080, usage_log_path="/spool/usage.jsonl")
    return Scheduler(pool, cache, gateway, SchedulerSettings()), cache


def _versions(cache: SnapshotCache) -> dict[str, str]:
    assert cache.snapshot is not None
    return {type_url: cache.snapshot.version(type_url) for type_url in PUSH_ORDER}


async def test_two_xds_replicas_build_identical_versions_whatever_order_postgres_returns_rows_in(database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        await seed_demo(pool, b"secret", NODES)
        first, first_cache = _replica(pool)
        await first.rebuild()
        # An update writes a new row version elsewhere in the heap: a scan now returns node-1 after the others
        # (what heartbeats and load reports do all day). The state is the same; so must the snapshot be.
        async with pool.acquire() as conn:
            await conn.execute("UPDATE nodes SET weight = weight WHERE name = 'node-1'")
            names = [r["name"] for r in await conn.fetch("SELECT name FROM nodes WHERE status = 'active'")]
        assert names[-1] == "node-1", names  # the premise: heap order really moved
        second, second_cache = _replica(pool)
        await second.rebuild()
        assert _versions(first_cache) == _versions(second_cache)
        assert all(_versions(first_cache).values())
        # The same resources byte for byte, not only the same hash.
        for type_url in PUSH_ORDER:
            assert ([r.SerializeToString(deterministic=True) for r in first_cache.snapshot.resources(type_url)] ==
                    [r.SerializeToString(deterministic=True) for r in second_cache.snapshot.resources(type_url)])
        # A replica rebuilding the unchanged state again pushes nothing.
        await first.rebuild()
        assert first_cache.set(second_cache.snapshot) is False
    finally:
        await pool.close()


_VERSIONS_SCRIPT = """
from crosslogic.xds.model import GatewaySettings
from crosslogic.xds.snapshot import PUSH_ORDER, build_snapshot
snapshot = build_snapshot([], GatewaySettings(listen_host="0.0.0.0", listen_port=8080, usage_log_path="/spool/u.jsonl"))
print(",".join(snapshot.version(t) for t in PUSH_ORDER))
"""


def test_the_versions_do_not_depend_on_the_processs_hash_seed():
    """Each replica is its own process with its own hash seed: the usage log's JSON format (a Struct, a map
    inside an Any) once serialised in seed order, so two replicas sent different listener bytes."""
    import os
    import subprocess
    import sys

    versions = {subprocess.run([sys.executable, "-c", _VERSIONS_SCRIPT], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3, 4)}
    assert len(versions) == 1, versions
