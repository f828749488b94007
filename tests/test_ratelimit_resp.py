"""The limiter's lean script client (ratelimit/resp.py) on a real Valkey and against misbehaving servers: exact
under concurrency, concurrent calls sharing writes, NOSCRIPT, cancelled callers, dead and silent connections."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import hiredis
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from crosslogic.ratelimit import resp
from crosslogic.ratelimit.engine import Limiter
from crosslogic.ratelimit.limits import LayerLimits, TenantLimits
from crosslogic.ratelimit.lua import LuaScript
from crosslogic.ratelimit.resp import ScriptClient, command
from crosslogic.runtime.processes import free_port

LIMITS = TenantLimits(LayerLimits(), LayerLimits(requests_per_min=37), LayerLimits(concurrency=50))


@pytest.fixture
async def redis(valkey_url):
    client = aioredis.from_url(valkey_url)
    yield client
    await client.aclose()


@pytest.fixture
async def scripts(valkey_url):
    client = ScriptClient(valkey_url)
    yield client
    await client.aclose()


def _ids() -> tuple[str, str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())


@given(st.lists(st.one_of(st.text(), st.binary(), st.integers(-(2**63), 2**63 - 1)), max_size=20))
def test_commands_are_encoded_as_redis_py_encodes_them(parts):
    # (redis-py splits a command name holding spaces; ours are fixed words)
    assert command("EVALSHA", *parts) == b"".join(Connection().pack_command("EVALSHA", *parts))


_ARGS = st.lists(st.one_of(st.text(), st.integers(0, 2**63 - 1)), max_size=12)


@given(_ARGS, _ARGS)
def test_an_evalsha_is_the_script_digest_the_key_count_the_keys_and_the_arguments(keys, args):
    script = LuaScript("return 1")
    expected = command("EVALSHA", hashlib.sha1(b"return 1").hexdigest(), len(keys), *keys, *args)
    assert ScriptClient("redis://127.0.0.1:1/0")._evalsha(script, keys, args) == expected


async def test_concurrent_reservations_share_writes_and_stay_exact(redis, scripts, monkeypatch):
    writes, loads = [], []
    flush = resp._Connection._flush

    def counting(self):
        writes.append(len(self.out))
        loads.extend(payload for payload in self.out if b"SCRIPT" in payload[:32])
        flush(self)

    monkeypatch.setattr(resp._Connection, "_flush", counting)
    limiter = Limiter(redis, scripts=scripts)
    org, env, key = _ids()
    await redis.script_flush()  # every call meets NOSCRIPT: one SCRIPT LOAD serves them all
    decisions = await asyncio.gather(*(limiter.reserve(org, env, key, uuid.uuid4().hex, 10, LIMITS)
                                       for _ in range(100)))
    assert sum(d.admitted for d in decisions) == 37  # the request limit, exactly
    assert {(d.layer, d.kind) for d in decisions if not d.admitted} == {("env", "requests_per_min")}
    assert len(loads) == 1  # one SCRIPT LOAD for the 100 calls that met NOSCRIPT
    assert sum(writes) >= 200 and len(writes) < 10, writes  # 100 concurrent calls, sent twice, in a few writes


async def test_a_forgotten_script_is_loaded_again_and_a_cancelled_caller_keeps_the_others_in_order(redis, scripts):
    limiter = Limiter(redis, scripts=scripts)
    org, env, key = _ids()
    limits = TenantLimits(LayerLimits(), LayerLimits(), LayerLimits(tokens_per_min=1_000))
    assert (await limiter.reserve(org, env, key, uuid.uuid4().hex, 1, limits)).admitted
    await redis.script_flush()  # what a Valkey restart does to the script cache
    calls = [asyncio.ensure_future(limiter.reserve(org, env, key, uuid.uuid4().hex, 1, limits)) for _ in range(20)]
    await asyncio.sleep(0)
    calls[3].cancel()  # Envoy gave up on one check: its reply is read and dropped
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert all(d.admitted for i, d in enumerate(done) if i != 3)
    assert await scripts.execute("PING") == b"PONG"  # the next reply is still its own
    assert await scripts.execute("ECHO", "after") == b"after"


async def test_a_batch_is_one_write_its_replies_in_order_and_a_forgotten_script_is_loaded_once(redis, scripts,
                                                                                               monkeypatch):
    script = LuaScript("return {KEYS[1], ARGV[1]}")
    writes: list[int] = []
    await scripts.execute("PING")
    write = scripts._conn.transport.write
    monkeypatch.setattr(scripts._conn.transport, "write", lambda data: (writes.append(len(data)), write(data)))
    await redis.script_flush()
    replies = await scripts.evalsha_many(script, [([f"k{i}"], [i]) for i in range(50)])
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(50)]
    assert len(writes) == 3  # the batch, SCRIPT LOAD after its NOSCRIPT replies, the batch again
    writes.clear()
    assert await scripts.execute_many([("SET", "batch-key", 5), ("INCRBY", "batch-key", 2), ("GET", "batch-key")]) \
        == [b"OK", 7, b"7"]
    assert len(writes) == 1
    with pytest.raises(ResponseError):
        await scripts.execute_many([("PING",), ("NOSUCHCOMMAND",)])
    assert await scripts.execute_many([]) == []
    assert await scripts.execute("PING") == b"PONG"  # the order survived the error


async def test_durable_calls_share_one_wait_per_write_and_a_short_wait_keeps_the_write(valkey_url, monkeypatch):
    # This Valkey has no replica: every WAIT answers 0 after its timeout; the calls are answered anyway (the write
    # stands on the primary), each short write counted once.
    client = ScriptClient(valkey_url, wait_replicas=1, wait_timeout_ms=20)
    script = LuaScript("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    key = f"durable-{uuid.uuid4().hex}"
    try:
        await client.execute("SCRIPT", "LOAD", script.source)  # (a NOSCRIPT retry is a second write, a second WAIT)
        written: list[bytes] = []
        write = client._conn.transport.write
        monkeypatch.setattr(client._conn.transport, "write", lambda data: (written.append(data), write(data)))
        replies = await asyncio.gather(*(client.evalsha(script, [key], [1], durable=True) for _ in range(10)))
        assert sorted(replies) == list(range(1, 11))
        assert b"".join(written).count(b"WAIT") == 1 and client.wait_short == 1
        assert await client.evalsha_many(script, [([key], [5])] * 3, durable=True) == [15, 20, 25]
        assert client.wait_short == 2
        assert await client.evalsha(script, [key], [1]) == 26  # not durable: no WAIT
        assert b"".join(written).count(b"WAIT") == 2 and client.wait_short == 2
        assert await client.execute("GET", key) == b"26"
    finally:
        await client.aclose()


async def test_a_script_error_is_raised_and_leaves_the_connection_usable(scripts):
    with pytest.raises(ResponseError):
        await scripts.execute("NOSUCHCOMMAND")
    assert await scripts.execute("PING") == b"PONG"


async def test_a_dead_server_fails_the_calls_and_the_next_call_after_its_return_reconnects(tmp_path):
    from crosslogic.runtime.valkey import EmbeddedValkey

    server = EmbeddedValkey(tmp_path / "valkey").start()
    client = ScriptClient(server.url, connect_timeout=0.5, timeout=1.0)
    redis = aioredis.from_url(server.url)
    try:
        limiter = Limiter(redis, scripts=client)
        org, env, key = _ids()
        assert (await limiter.reserve(org, env, key, uuid.uuid4().hex, 1, LIMITS)).admitted
        server.stop()
        with pytest.raises(RedisError):  # the gate's failure policy takes it from here (fail-open or 503)
            await limiter.reserve(org, env, key, uuid.uuid4().hex, 1, LIMITS)
        with pytest.raises(RedisConnectionError):  # nobody listens: connecting fails at once
            await limiter.reserve(org, env, key, uuid.uuid4().hex, 1, LIMITS)
        server = EmbeddedValkey(tmp_path / "valkey", port=server.port).start()  # its script cache is empty
        assert (await limiter.reserve(org, env, key, uuid.uuid4().hex, 1, LIMITS)).admitted
    finally:
        await client.aclose()
        await redis.aclose()
        server.stop()


class FakeServer:
    """A TCP server that answers each command with `reply(parts)` (None: stays silent), recording them."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = free_port()

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (parts := parser.gets()) is not False:
                    self.commands.append(parts)
                    answer = self.reply(parts)
                    if answer is not None:
                        writer.write(answer)
        except ConnectionError:
            pass
        finally:
            writer.close()


async def test_no_reply_within_the_timeout_fails_every_call_in_flight_and_drops_the_connection():
    async with FakeServer(lambda parts: None) as server:
        client = ScriptClient(f"redis://127.0.0.1:{server.port}/0", timeout=0.2)
        try:
            calls = [asyncio.ensure_future(client.execute("PING")) for _ in range(3)]
            for outcome in await asyncio.gather(*calls, return_exceptions=True):
                assert isinstance(outcome, RedisTimeoutError)
            with pytest.raises(RedisTimeoutError):
                await client.execute("PING")  # a new connection: replies are matched by order, never reused
            assert server.connections == 2
        finally:
            await client.aclose()


@pytest.mark.parametrize(("url", "answer", "words"), [
    ("redis://127.0.0.1:{port}/0", b"?what\r\n", "protocol"),  # garbage
    ("redis://:bad@127.0.0.1:{port}/0", b"-WRONGPASS invalid password\r\n", "WRONGPASS"),  # a refused login
])
async def test_garbage_or_a_refused_login_is_a_connection_error(url, answer, words):
    async with FakeServer(lambda parts: answer) as server:
        client = ScriptClient(url.format(port=server.port))
        try:
            with pytest.raises(RedisConnectionError, match=words):
                await client.execute("PING")
        finally:
            await client.aclose()


async def test_the_url_s_credentials_and_database_are_sent_before_the_first_command():
    async with FakeServer(lambda parts: b"+OK\r\n") as server:
        client = ScriptClient(f"redis://svc:p%40ss@127.0.0.1:{server.port}/3")
        try:
            assert await client.execute("PING") == b"OK"
        finally:
            await client.aclose()
    assert server.commands == [[b"AUTH", b"svc", b"p@ss"], [b"SELECT", b"3"], [b"PING"]]


async def test_calls_after_close_fail_and_closing_twice_is_harmless(scripts):
    assert await scripts.execute("PING") == b"PONG"
    await scripts.aclose()
    await scripts.aclose()
    with pytest.raises(RedisConnectionError):
        await scripts.execute("PING")
