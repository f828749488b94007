"""CPU per `Authorizer.decide()` call, with real Valkey and Postgres: this tree against a baseline revision.

    .venv/bin/python bench/authz_decide.py [--baseline REV] [--seconds 4] [--rounds 3] [--concurrency 1 16]
                                           [--profile this|baseline]

One embedded Postgres and one embedded Valkey serve every round. Each round runs a worker process per tree
(the baseline is `git archive REV`, imported through PYTHONPATH), interleaved, so both see the same machine
load. A worker builds the authoriser as `serve authz` wires it (identity, catalogue, limits, quotas, bill cap,
admission gate), warms its caches, then calls decide() in a closed loop from `concurrency` coroutines for
`seconds` with a one-token chat request as Envoy forwards it. Printed per tree: calls/s, the worker's CPU µs per
call (event loop and Redis client included: the ext_authz process minus its transport), Valkey's and
Postgres's CPU µs per call, and the ratios this/baseline. `--profile` prints a cProfile of one tree's worker.
Only ratios are comparable across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "Hello there"}],
                   "max_tokens": 1}).encode()


# --- the worker (runs against either tree: only the public wiring of each is used) ----------------------------
def _headers(api_key: str) -> dict[str, str]:
    return {":authority": "127.0.0.1:8080", ":method": "POST", ":path": "/v1/chat/completions", ":scheme": "http",
            "authorization": f"Bearer {api_key}", "content-type": "application/json", "accept": "application/json",
            "user-agent": "OpenAI/Python 1.99.0", "x-stainless-lang": "python", "x-stainless-os": "Linux",
            "content-length": str(len(BODY)), "x-forwarded-proto": "http", "x-forwarded-for": "127.0.0.1",
            "x-envoy-internal": "true"}


async def _authorizer(settings):  # noqa: ANN202 - yields whatever the tree's Authorizer is
    """The tree's own composition root if it has one, else main's wiring of serve_authz (7f499f8)."""
    try:
        from crosslogic.extauthz.service import authorizer_from_settings
    except ImportError:
        return _legacy_authorizer(settings)
    return authorizer_from_settings(settings)


class _legacy_authorizer:  # noqa: N801 - an async context manager, named as the function it stands for
    def __init__(self, settings) -> None:
        self.settings = settings

    async def __aenter__(self):
        import redis.asyncio as aioredis  # noqa: I001 - these modules are the baseline tree's


        from crosslogic.extauthz.billcap import BillCapGuard, follow_price_changes
        from crosslogic.extauthz.catalog import ModelCatalogue
        from crosslogic.extauthz.decision import Authorizer
        from crosslogic.extauthz.identity import IdentityResolver, follow_tenancy_changes
        from crosslogic.ratelimit.engine import limiter_from_settings
        from crosslogic.ratelimit.gate import AdmissionGate
        from crosslogic.ratelimit.money import MoneyLimiter
        from crosslogic.ratelimit.quota import QuotaGuard
        from crosslogic.ratelimit.store import LimitStore, follow_limit_changes
        from crosslogic.store.db import open_pool

        s = self.settings
        self.redis = aioredis.from_url(s.redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
        self.pool_cm = open_pool(s.database_url, min_size=2, max_size=16)
        pool = await self.pool_cm.__aenter__()
        resolver = IdentityResolver(pool, self.redis, redis_ttl_s=s.identity_cache_ttl_s)
        catalogue = ModelCatalogue(pool)
        quotas = QuotaGuard(pool, self.redis, ttl_s=s.limits_cache_ttl_s)
        limits = LimitStore(pool, ttl_s=s.limits_cache_ttl_s)
        gate = AdmissionGate(limiter_from_settings(self.redis, s), limits)
        caps = BillCapGuard(pool, MoneyLimiter(self.redis, s.reservation_ttl_ms))

        def limits_changed() -> None:
            quotas.clear()
            limits.clear()

        self.tasks = [asyncio.create_task(follow_tenancy_changes(s.database_url, resolver, catalogue.mark_stale)),
                      asyncio.create_task(follow_limit_changes(s.database_url, limits_changed)),
                      asyncio.create_task(follow_price_changes(s.database_url, caps))]
        return Authorizer(resolver, catalogue, s.require_key_secret(), s.default_region, quotas, caps, gate)

    async def __aexit__(self, *exc) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.pool_cm.__aexit__(None, None, None)
        await self.redis.aclose()


async def _work(args: argparse.Namespace) -> dict:
    from crosslogic.settings import Settings

    os.environ.update({"CROSSLOGIC_DATABASE_URL": args.database_url, "CROSSLOGIC_REDIS_URL": args.redis_url,
                       "CROSSLOGIC_KEY_SECRET": args.secret})
    settings = Settings()
    headers = _headers(args.api_key)
    async with await _authorizer(settings) as parts:
        authorizer = getattr(parts, "authorizer", parts)
        calls = 0

        async def loop(deadline: float) -> None:
            nonlocal calls
            while time.perf_counter() < deadline:
                await authorizer.decide("POST", "/v1/chat/completions",
                                        {**headers, "x-request-id": uuid.uuid4().hex}, BODY)
                calls += 1

        await asyncio.gather(*(loop(time.perf_counter() + 1.0) for _ in range(args.concurrency)))  # warm
        calls = 0
        profile = None
        if args.profile_out:
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(loop(time.perf_counter() + args.seconds) for _ in range(args.concurrency)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile_out)
    return {"calls": calls, "wall": wall, "cpu": cpu}


def worker_main(args: argparse.Namespace) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_work(args))))
    return 0


# --- the driver ----------------------------------------------------------------------------------------------------
def _cpu(pid: int) -> float:
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def _seed(database_url: str, secret: bytes) -> dict:
    import asyncpg

    from crosslogic.store.db import migrate
    from crosslogic.store.demo import seed_demo

    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        demo = await seed_demo(conn, secret, [("bench-node", "127.0.0.1", 9, ["llama-3-8b"])])
        # Limits on every layer the demo plan limits, never reached; no concurrency limit: nothing here ends a
        # request, so its leases would pile up (the gateway's own benches release them).
        await conn.execute("UPDATE plan_limits SET tokens_per_min = 1000000000, requests_per_min = 100000000, "
                           "concurrency_limit = NULL WHERE billing_plan = 'serverless'")
        return demo
    finally:
        await conn.close()


def _run_worker(tree: Path, args: argparse.Namespace, env: dict, concurrency: int, profile_out: str | None,
                pids: dict[str, int]) -> dict:
    command = [sys.executable, str(HERE / "bench" / "authz_decide.py"), "--worker", "--seconds", str(args.seconds),
               "--concurrency", str(concurrency), "--database-url", env["database_url"], "--redis-url",
               env["redis_url"], "--secret", env["secret"], "--api-key", env["api_key"]]
    if profile_out:
        command += ["--profile-out", profile_out]
    before = {name: _cpu(pid) for name, pid in pids.items()}
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tree,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    after = {name: _cpu(pid) for name, pid in pids.items()}
    if done.returncode != 0:
        raise RuntimeError(f"worker in {tree} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out.update({f"{name}_cpu": after[name] - before[name] for name in pids})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="7f499f8", help="git revision to compare against ('' for none)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--profile", choices=["this", "baseline"])
    parser.add_argument("--cold-keys", type=int, default=2000,
                        help="keys for the cold-key phase: one Postgres view query vs a shared Redis tier (0: skip)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--database-url", "--redis-url", "--secret", "--api-key", "--profile-out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.concurrency = args.concurrency[0]
        return worker_main(args)

    sys.path.insert(0, str(HERE))
    from crosslogic.runtime.postgres import EmbeddedPostgres
    from crosslogic.runtime.valkey import EmbeddedValkey

    with tempfile.TemporaryDirectory(prefix="clp-decide-") as tmp:
        trees = {"this": HERE}
        if args.baseline:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline], cwd=HERE, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
            trees["baseline"] = base
        postgres = EmbeddedPostgres(Path(tmp) / "pg").start()
        valkey = EmbeddedValkey(Path(tmp) / "valkey").start()
        try:
            secret = uuid.uuid4().hex
            demo = asyncio.run(_seed(postgres.url, secret.encode()))
            env = {"database_url": postgres.url, "redis_url": valkey.url, "secret": secret,
                   "api_key": demo["api_key"]}
            pids = {"valkey": valkey.child.proc.pid, "postgres": postgres.child.proc.pid}
            results: dict[tuple[str, int], list[dict]] = {}
            for concurrency in args.concurrency:
                for _ in range(args.rounds):
                    for name, tree in trees.items():
                        results.setdefault((name, concurrency), []).append(
                            _run_worker(tree, args, env, concurrency, None, pids))
            _report(results, trees, args.concurrency)
            if args.cold_keys:
                asyncio.run(_cold_keys(postgres.url, valkey.url, args.cold_keys, pids))
            if args.profile:
                out = str(Path(tmp) / "profile.out")
                _run_worker(trees[args.profile], args, env, args.concurrency[-1], out, pids)
                import pstats

                pstats.Stats(out).sort_stats("tottime").print_stats(35)
        finally:
            valkey.stop()
            postgres.stop()
    return 0


async def _cold_keys(database_url: str, redis_url: str, count: int, pids: dict[str, int]) -> None:
    """A key's first request on a replica: its view from one Postgres join (this tree), against what a shared
    Redis tier would cost instead (one GET of the serialised view and its decoding; a miss also pays the
    tier's write: SET plus the org/env/key index entries and their expiry, as the old identity tier did)."""
    import asyncpg
    import redis.asyncio as aioredis

    from crosslogic.extauthz.tenants import TenantCache
    from crosslogic.keys import generate_api_key, hash_api_key
    from crosslogic.store import tenancy

    conn = await asyncpg.connect(database_url)
    org = await conn.fetchval("SELECT org_id::text FROM orgs WHERE name = 'demo'")
    env = await conn.fetchval("SELECT env_id::text FROM environments WHERE org_id = $1::uuid", org)
    hashes = []
    for _ in range(count):
        plaintext = generate_api_key()
        hashes.append(hash_api_key(b"cold", plaintext))
        await conn.execute("INSERT INTO api_keys (key_hash, key_prefix, org_id, env_id, name) VALUES "
                           "($1, 'cold', $2::uuid, $3::uuid, 'cold')", hashes[-1], org, env)
    await conn.close()
    del tenancy
    pool = await asyncpg.create_pool(database_url, min_size=4, max_size=4)
    redis = aioredis.from_url(redis_url)
    views = TenantCache(pool)

    async def timed(name: str, one, server: str) -> dict:
        before_server, cpu, wall = _cpu(pids[server]), time.process_time(), time.perf_counter()
        for i in range(0, len(hashes), 16):  # 16 cold keys at a time, as concurrent first requests
            await asyncio.gather(*(one(h) for h in hashes[i:i + 16]))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {"name": name, "wall": wall / count * 1e6, "cpu": cpu / count * 1e6,
                "server": (_cpu(pids[server]) - before_server) / count * 1e6, "server_name": server}

    sample = await views.view(hashes[0])
    payload = json.dumps({"row": {k: str(v) for k, v in
                                  (await pool.fetchrow("SELECT * FROM api_keys LIMIT 1")).items()},
                          "view": repr(sample)}).encode()  # about the size of a serialised view

    async def tier_hit(key_hash: str) -> None:
        raw = await redis.get("clp:view:" + key_hash)
        json.loads(raw)

    async def tier_fill(key_hash: str) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set("clp:view:" + key_hash, payload, ex=60)
            for kind in ("org", "env", "key"):
                pipe.sadd(f"clp:view-deps:{kind}:{key_hash[:8]}", key_hash)
                pipe.expire(f"clp:view-deps:{kind}:{key_hash[:8]}", 120)
            await pipe.execute()

    rows = [await timed("postgres: one view join", views.view, "postgres")]
    rows.append(await timed("redis tier: fill on miss", tier_fill, "valkey"))
    rows.append(await timed("redis tier: hit (GET+decode)", tier_hit, "valkey"))
    print(f"\ncold keys ({count}, 16 at a time): per key")
    print(f"{'path':<30} {'wall µs':>9} {'client CPU µs':>14} {'server CPU µs':>14}")
    for r in rows:
        print(f"{r['name']:<30} {r['wall']:>9.1f} {r['cpu']:>14.1f} {r['server']:>14.1f} ({r['server_name']})")
    await views.aclose()
    await pool.close()
    await redis.aclose()


def _report(results: dict[tuple[str, int], list[dict]], trees: dict[str, Path], concurrencies: list[int]) -> None:
    print(f"{'tree':<10} {'c':>3} {'calls/s':>9} {'authz µs':>9} {'valkey µs':>10} {'pg µs':>7}   (CPU per call, "
          f"median of rounds)")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for concurrency in concurrencies:
        for name in trees:
            rounds = results[(name, concurrency)]

            def median(values: list[float]) -> float:
                ordered = sorted(values)
                return ordered[len(ordered) // 2]

            m = {"rate": median([r["calls"] / r["wall"] for r in rounds]),
                 "authz": median([r["cpu"] / r["calls"] * 1e6 for r in rounds]),
                 "valkey": median([r["valkey_cpu"] / r["calls"] * 1e6 for r in rounds]),
                 "postgres": median([r["postgres_cpu"] / r["calls"] * 1e6 for r in rounds])}
            medians[(name, concurrency)] = m
            print(f"{name:<10} {concurrency:>3} {m['rate']:>9.0f} {m['authz']:>9.1f} {m['valkey']:>10.1f} "
                  f"{m['postgres']:>7.1f}")
        if "baseline" in trees:
            this, base = medians[("this", concurrency)], medians[("baseline", concurrency)]
            print(f"   ratio this/baseline at c={concurrency}: calls/s {this['rate'] / base['rate']:.2f}, authz CPU "
                  f"{this['authz'] / base['authz']:.2f}, valkey CPU {this['valkey'] / max(base['valkey'], 1e-9):.2f}")


if __name__ == "__main__":
    sys.exit(main())
