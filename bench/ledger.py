"""Usage rows per second into the Postgres ledger, end to end, on a fresh embedded Postgres.

Three paths, measured in the same run on the same database so the ratios mean something:
  baseline   prebuilt UsageRecords -> write_batch (price lock, INSERT … priced by joining the version tables at
             each row's occurred_at … ON CONFLICT, monthly spend and owed)
  backstop   Envoy JSON-lines usage log on disk -> tail -> parse -> price -> write_batch -> commit position
  als        gRPC HTTPAccessLogEntry protos -> record_from_entry -> LedgerWriter batches
Goal (issue 5): >= 20k rows/s.

    python bench/ledger.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402
from envoy.data.accesslog.v3 import accesslog_pb2  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from crosslogic.accounting.backstop import BackstopReplayer, UsageLogTailer  # noqa: E402
from crosslogic.accounting.ledger import LedgerWriter, write_batch  # noqa: E402
from crosslogic.accounting.usage import AUTHZ_NAMESPACE, USAGE_NAMESPACE, UsageRecord, record_from_entry  # noqa: E402
from crosslogic.runtime.postgres import EmbeddedPostgres  # noqa: E402
from crosslogic.store.db import migrate  # noqa: E402

BATCH = 2000
ORGS = [str(uuid.uuid4()) for _ in range(20)]


def _authz(i: int) -> dict:
    return {"org_id": ORGS[i % len(ORGS)], "env_id": ORGS[(i + 1) % len(ORGS)], "key_id": ORGS[(i + 2) % len(ORGS)],
            "model": "llama-3-8b", "region": "ap-south", "endpoint": "chat.completions", "streamed": i % 2 == 0}


def _usage(i: int) -> dict:
    return {"prompt_tokens": 10 + i % 50, "completion_tokens": i % 200, "finished": True, "mode": "json"}


def records(prefix: str, n: int) -> list[UsageRecord]:
    now = datetime.now(UTC)
    return [UsageRecord(request_id=f"{prefix}-{i}", occurred_at=now, org_id=_authz(i)["org_id"],
                        env_id=_authz(i)["env_id"], key_id=_authz(i)["key_id"], region="ap-south",
                        model="llama-3-8b", endpoint="chat.completions", streamed=False, status_code=200,
                        prompt_tokens=10 + i % 50, completion_tokens=i % 200, usage_source="reported",
                        latency_ms=5, node="127.0.0.1:9000") for i in range(n)]


def usage_log(path: Path, prefix: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"request_id": f"{prefix}-{i}", "start_time": f"{time.time():.6f}", "status": 200,
                                "duration_ms": 5, "upstream": "127.0.0.1:9000", "authz": _authz(i),
                                "usage": _usage(i)}) + "\n")


def als_entries(prefix: str, n: int) -> list[accesslog_pb2.HTTPAccessLogEntry]:
    entries = []
    for i in range(n):
        entry = accesslog_pb2.HTTPAccessLogEntry()
        entry.request.request_id = f"{prefix}-{i}"
        entry.response.response_code.value = 200
        entry.common_properties.start_time.GetCurrentTime()
        for namespace, values in ((AUTHZ_NAMESPACE, _authz(i)), (USAGE_NAMESPACE, _usage(i))):
            s = struct_pb2.Struct()
            s.update(values)
            entry.common_properties.metadata.filter_metadata[namespace].CopyFrom(s)
        entries.append(entry)
    return entries


async def bench(url: str, n: int, work: Path) -> None:
    await migrate(url)
    pool = await asyncpg.create_pool(url, min_size=2, max_size=4)
    try:
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO regions (region_id, display_name) VALUES ('ap-south', 'x')")
            await conn.execute("INSERT INTO models (model_id, input_price_microdollars_per_1m, "
                               "output_price_microdollars_per_1m) VALUES ('llama-3-8b', 50000, 80000)")
            await conn.executemany("INSERT INTO orgs (org_id, name) VALUES ($1, $2)",
                                   [(uuid.UUID(org), f"org-{i}") for i, org in enumerate(ORGS)])

        base = records("base", n)
        t0 = time.perf_counter()
        async with pool.acquire() as conn:
            for i in range(0, n, BATCH):
                await write_batch(conn, base[i:i + BATCH])
        baseline = n / (time.perf_counter() - t0)

        log_path = work / "usage.jsonl"
        usage_log(log_path, "file", n)
        replayer = BackstopReplayer(UsageLogTailer(log_path, work / "usage.position"), pool)
        t0 = time.perf_counter()
        while await replayer.step():
            pass
        backstop = replayer.replayed / (time.perf_counter() - t0)

        entries = als_entries("als", n)
        writer = LedgerWriter(pool, BATCH, 0.2)
        t0 = time.perf_counter()
        for entry in entries:
            record = record_from_entry(entry)
            if record is not None:
                writer.add(record)
        await writer.flush()
        als = writer.written / (time.perf_counter() - t0)

        async with pool.acquire() as conn:
            rows = await conn.fetchval("SELECT count(*) FROM usage_records")
        assert rows == 3 * n, rows
        print(f"rows per path: {n:,}  (batch {BATCH})")
        print(f"baseline  write_batch of prebuilt records : {baseline:10,.0f} rows/s  1.00x")
        print(f"backstop  usage log -> ledger             : {backstop:10,.0f} rows/s  {backstop / baseline:.2f}x")
        print(f"als       access-log protos -> ledger     : {als:10,.0f} rows/s  {als / baseline:.2f}x")
        print(f"goal >= 20,000 rows/s end to end: {'met' if min(backstop, als) >= 20_000 else 'NOT met'}")
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        postgres = EmbeddedPostgres(work / "pg").start()
        try:
            asyncio.run(bench(postgres.url, args.rows, work))
        finally:
            postgres.stop()


if __name__ == "__main__":
    main()
