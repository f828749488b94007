"""Access-log entries become usage records; the ledger writes each request exactly once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
from envoy.data.accesslog.v3 import accesslog_pb2

from crosslogic.accounting.ledger import LedgerWriter, write_batch
from crosslogic.accounting.usage import AUTHZ_NAMESPACE, USAGE_NAMESPACE, record_from_entry
from tests.billing_helpers import priced_catalogue

ORG, ENV, KEY = (str(uuid.uuid4()) for _ in range(3))


def entry(request_id: str = "req-1", usage: dict | None = None, authz: dict | None = None,
          status: int = 200) -> accesslog_pb2.HTTPAccessLogEntry:
    log = accesslog_pb2.HTTPAccessLogEntry()
    log.request.request_id = request_id
    log.response.response_code.value = status
    log.common_properties.start_time.FromDatetime(datetime(2026, 11, 27, 12, 0, tzinfo=UTC))
    log.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(42)
    log.common_properties.upstream_remote_address.socket_address.address = "10.1.2.3"
    log.common_properties.upstream_remote_address.socket_address.port_value = 8000
    metadata = log.common_properties.metadata.filter_metadata
    metadata[AUTHZ_NAMESPACE].update(authz if authz is not None else {
        "org_id": ORG, "env_id": ENV, "key_id": KEY, "model": "llama-3-8b", "region": "ap-south",
        "endpoint": "chat.completions", "streamed": True})
    if usage is not None:
        metadata[USAGE_NAMESPACE].update(usage)
    return log


def test_finished_stream_is_reported_usage():
    record = record_from_entry(entry(usage={"prompt_tokens": 12, "completion_tokens": 30, "finished": True}))
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (12, 30, 42)
    assert record.usage_source == "reported" and record.latency_ms == 42 and record.streamed
    assert record.node == "10.1.2.3:8000"


def test_stream_cut_short_keeps_the_tokens_seen_and_says_so():
    record = record_from_entry(entry(usage={"prompt_tokens": 12, "completion_tokens": 7, "finished": False}))
    assert record.usage_source == "partial" and record.completion_tokens == 7


def test_request_without_usage_is_recorded_with_zero_tokens():
    record = record_from_entry(entry(status=503))
    assert record.usage_source == "none" and record.total_tokens == 0 and record.status_code == 503


def test_requests_refused_before_a_model_was_chosen_are_not_billed():
    assert record_from_entry(entry(authz={})) is None
    assert record_from_entry(entry(authz={"org_id": ORG, "env_id": ENV, "key_id": KEY})) is None


async def test_ledger_writes_each_request_id_once(database_url):
    records = [record_from_entry(entry(f"req-{i}", {"prompt_tokens": 3, "completion_tokens": 4, "finished": True}))
               for i in range(5)]
    conn = await asyncpg.connect(database_url)
    try:
        await priced_catalogue(conn, [ORG])
        assert (await write_batch(conn, records)).inserted == 5
        assert (await write_batch(conn, records[2:] + records[:1])).inserted == 0  # replayed log entries
        assert await conn.fetchval("SELECT count(*) FROM usage_records") == 5
        assert await conn.fetchval("SELECT sum(total_tokens) FROM usage_records") == 35
    finally:
        await conn.close()


async def test_ledger_writer_holds_records_until_postgres_accepts_them(database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await priced_catalogue(conn, [ORG])
        writer = LedgerWriter(pool, batch_size=2, flush_interval_s=0.01)
        for i in range(5):
            writer.add(record_from_entry(entry(f"w-{i}", {"prompt_tokens": 1, "completion_tokens": 1,
                                                          "finished": True})))
        await writer.flush()
        assert writer.pending == [] and writer.written == 5
        assert await pool.fetchval("SELECT count(*) FROM usage_records") == 5
    finally:
        await pool.close()
