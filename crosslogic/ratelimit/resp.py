"""A lean Redis client for the limiter's per-request script calls (reserve, release): one connection, commands
pipelined as they come, replies matched in order.

Why not redis-py for these: measured on this box (bench/authz_decide.py, profile), a reservation's EVALSHA spent
~160 µs of CPU in redis-py (it encodes each of ~40 arguments through its Encoder, takes a connection from the
pool, writes and reads under a lock) against ~10 µs of actual work. Here a call is: the script's pre-encoded
`EVALSHA <sha>` prefix plus its arguments as RESP bulk strings in one bytes join, appended to the connection's
output; everything appended in the same event-loop turn goes out in one write (auto-pipelining at the protocol
level: concurrent admissions share a write and Valkey reads them together); hiredis (C) parses the replies, each
resolving the oldest pending future.

Safety, as the redis-py path had it (tests/test_ratelimit_resp.py):
- NOSCRIPT (Valkey restarted and forgot its scripts): nothing of the call ran; the script is loaded through this
  connection and the call sent again.
- The connection dies: every call in flight fails with ConnectionError (the caller's failure policy decides:
  fail-open or 503); the next call reconnects. A call whose reply does not come within `timeout` fails with
  TimeoutError and the connection is dropped (replies are matched by order, so a connection with a lost reply
  cannot be trusted with the next one).
- A cancelled caller (Envoy gave up on the check) only loses its answer: its reply is read and dropped, so the
  order of the others is kept.

Durability (`wait_replicas` > 0: a Valkey Cluster, or any replicated Redis): a `durable` call (reserve, settle) is
answered only after `WAIT <replicas> <timeout_ms>` sent in the same write, right behind every durable call of that
write (one WAIT per batch, not per call: WAIT blocks the connection until the replicas acknowledge the offset of its
last write, so it covers the whole batch). Replication is asynchronous without it: a primary SIGKILLed just after
answering takes the acknowledged write along (tests/test_valkey_cluster.py saw it in ~2 of 6 runs). Fewer replicas
than asked within the timeout (a replica down or lagging) is answered anyway: the write stands on the primary, as on
an unreplicated Valkey; it is counted (`wait_short`) and logged. Refusing there would turn a replica's outage into a
client-facing outage; retrying the WAIT would stall every admission on that connection behind it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from crosslogic.ratelimit.lua import LuaScript

Arg = str | bytes | int
log = logging.getLogger("crosslogic.ratelimit")


def _bulk(value: Arg) -> bytes:
    data = value if isinstance(value, bytes) else value.encode() if isinstance(value, str) else b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(data), data)


class Encoded:
    """Arguments encoded once and spliced into later calls as they are (the constant part of a command)."""

    __slots__ = ("count", "data")

    def __init__(self, parts: Sequence[Arg]) -> None:
        self.count = len(parts)
        self.data = b"".join(map(_bulk, parts))


def _encoded(items: Sequence[Arg | Encoded]) -> tuple[int, list[bytes]]:
    count, out = 0, []
    for item in items:
        if isinstance(item, Encoded):
            count += item.count
            out.append(item.data)
        else:
            count += 1
            out.append(_bulk(item))
    return count, out


def command(*parts: Arg) -> bytes:
    """One command in RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(p) for p in parts)


def script_digest(script: LuaScript) -> str:
    """The SHA1 Redis names a script by (what SCRIPT LOAD answers), computed here: no round trip needed."""
    return hashlib.sha1(script.source.encode()).hexdigest()


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.pending: deque[tuple[asyncio.Future, float]] = deque()  # (caller, deadline), in the order sent
        self.out: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.broken: BaseException | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.wait_command = b""  # WAIT <replicas> <timeout_ms>, appended to a write holding durable calls
        self.wait_timeout_s = 0.0
        self.batch_wait: asyncio.Future | None = None  # the WAIT reply of the write being gathered
        self.on_wait: Callable[[Any], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send_durable(self, payload: bytes) -> tuple[asyncio.Future, asyncio.Future]:
        """(the call's reply, the reply of the WAIT sent after every call of this write)."""
        future = self.send(payload)
        if self.broken is not None:
            return future, future
        if self.batch_wait is None:
            self.batch_wait = self.loop.create_future()
            self.batch_wait.add_done_callback(self._waited)
        return future, self.batch_wait

    def _waited(self, future: asyncio.Future) -> None:
        # Once per WAIT, however many callers share it (an error is theirs too; retrieved here either way).
        if not future.cancelled() and future.exception() is None and self.on_wait is not None:
            self.on_wait(future.result())

    def send(self, payload: bytes) -> asyncio.Future:
        future = self.loop.create_future()
        if self.broken is not None:
            future.set_exception(self.broken)
            return future
        if not self.out:
            self.loop.call_soon(self._flush)  # after the callbacks already queued: their calls join this write
        self.out.append(payload)
        deadline = self.loop.time() + self.timeout
        self.pending.append((future, deadline))
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._check_deadline)
        return future

    def _flush(self) -> None:
        waiting, self.batch_wait = self.batch_wait, None
        if waiting is not None:
            if self.broken is not None:
                waiting.set_exception(self.broken)
            else:
                self.out.append(self.wait_command)
                self.pending.append((waiting, self.loop.time() + self.timeout + self.wait_timeout_s))
        if self.out and self.transport is not None and self.broken is None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._break(RedisConnectionError(f"redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self._break(RedisConnectionError("redis sent a reply nobody asked for"))
                return
            future, _ = pending.popleft()
            if not future.done():  # done: its caller was cancelled; the reply is dropped, the order kept
                future.set_result(reply)

    def _check_deadline(self) -> None:
        self.timer = None
        if not self.pending:
            return
        deadline = self.pending[0][1]
        if deadline <= self.loop.time():
            self._break(RedisTimeoutError(f"no reply from redis within {self.timeout} s"))
        else:
            self.timer = self.loop.call_at(deadline, self._check_deadline)

    def _break(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        if self.transport is not None:
            self.transport.abort()
        self._fail_pending()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.broken is None:
            self.broken = RedisConnectionError(f"connection to redis lost ({exc or 'closed'})")
        self._fail_pending()

    def _fail_pending(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(self.broken)


class ScriptClient:
    """EVALSHA of the limiter's scripts on one pipelined connection to the server of a redis:// (rediss://,
    unix://) URL. Close it with `aclose`."""

    def __init__(self, url: str, *, connect_timeout: float = 0.5, timeout: float = 0.5, wait_replicas: int = 0,
                 wait_timeout_ms: int = 50) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported redis URL scheme {parsed.scheme!r}")
        self.scheme = parsed.scheme
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.path = parsed.path if parsed.scheme == "unix" else ""
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        db = parsed.path.strip("/") if parsed.scheme != "unix" else ""
        self.db = int(db) if db.isdigit() else 0
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._prefixes: dict[int, bytes] = {}  # id(script) -> its encoded "EVALSHA <sha>"
        self._loading: dict[int, asyncio.Future] = {}  # id(script) -> its SCRIPT LOAD in flight
        self._closed = False
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.wait_short = 0  # durable writes answered with fewer replicas than asked

    async def evalsha(self, script: LuaScript, keys: Sequence[Arg | Encoded], args: Sequence[Arg | Encoded],
                      durable: bool = False) -> Any:
        """The script's reply (keys and args may hold pre-encoded runs); raises ResponseError for a script
        error, ConnectionError / TimeoutError (both RedisError) when Redis cannot answer. `durable`: answered
        after the replicas acknowledged it (see the module's doc)."""
        call = self._call_durable if durable and self.wait_replicas > 0 else self._call
        reply = await call(self._evalsha(script, keys, args))
        if isinstance(reply, ResponseError):
            if not str(reply).startswith("NOSCRIPT"):
                raise reply
            await self._load(script)
            reply = await call(self._evalsha(script, keys, args))
            if isinstance(reply, ResponseError):
                raise NoScriptError(str(reply)) if str(reply).startswith("NOSCRIPT") else reply
        return reply

    async def evalsha_many(self, script: LuaScript,
                           calls: Sequence[tuple[Sequence[Arg | Encoded], Sequence[Arg | Encoded]]],
                           durable: bool = False) -> list[Any]:
        """Many calls of one script sent in one write (a pipeline, not a transaction); their replies in order.
        Calls Redis answered NOSCRIPT did not run: the script is loaded and those calls sent again. Raises the
        first script error, or ConnectionError / TimeoutError as `evalsha` does. `durable`: one WAIT for all."""
        payloads = [self._evalsha(script, keys, args) for keys, args in calls]
        replies = await self._call_many(payloads, durable and self.wait_replicas > 0)
        missing = [i for i, reply in enumerate(replies)
                   if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")]
        if missing:
            await self._load(script)
            again = await self._call_many([payloads[i] for i in missing], durable and self.wait_replicas > 0)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise NoScriptError(str(reply)) if str(reply).startswith("NOSCRIPT") else reply
        return replies

    async def _load(self, script: LuaScript) -> None:
        """SCRIPT LOAD once for every caller that met NOSCRIPT meanwhile (a Valkey restart or failover empties
        the script cache under load: one load, not one per in-flight call)."""
        loading = self._loading.get(id(script))
        if loading is None or loading.done():
            loading = self._loading[id(script)] = asyncio.ensure_future(
                self._call(command("SCRIPT", "LOAD", script.source)))
        loaded = await asyncio.shield(loading)  # one caller cancelled must not cancel the others' load
        if isinstance(loaded, ResponseError):
            raise loaded

    async def execute_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Many commands in one write (a pipeline); their replies in order; raises the first error reply."""
        replies = await self._call_many([command(*parts) for parts in commands])
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    async def execute(self, *parts: Arg) -> Any:
        """Any other command (tests, PING)."""
        reply = await self._call(command(*parts))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def _evalsha(self, script: LuaScript, keys: Sequence[Arg | Encoded], args: Sequence[Arg | Encoded]) -> bytes:
        prefix = self._prefixes.get(id(script))
        if prefix is None:
            prefix = self._prefixes[id(script)] = _bulk("EVALSHA") + _bulk(script_digest(script))
        key_count, key_data = _encoded(keys)
        arg_count, arg_data = _encoded(args)
        return b"".join((b"*%d\r\n" % (key_count + arg_count + 3), prefix, _bulk(key_count), *key_data, *arg_data))

    async def _call(self, payload: bytes) -> Any:
        conn = self._conn
        if conn is None or conn.broken is not None:
            conn = await self._connection()
        return await conn.send(payload)

    async def _call_durable(self, payload: bytes) -> Any:
        conn = self._conn
        if conn is None or conn.broken is not None:
            conn = await self._connection()
        reply, waited = conn.send_durable(payload)
        result = await reply
        self._raise_refused(await waited)
        return result

    async def _call_many(self, payloads: list[bytes], durable: bool = False) -> list[Any]:
        if not payloads:
            return []
        conn = self._conn
        if conn is None or conn.broken is not None:
            conn = await self._connection()
        # All sent in this event-loop turn, so one write; a broken connection fails them all alike.
        if not durable:
            return list(await asyncio.gather(*[conn.send(payload) for payload in payloads]))
        sent = [conn.send_durable(payload) for payload in payloads]
        replies = list(await asyncio.gather(*(reply for reply, _ in sent)))
        self._raise_refused(await sent[-1][1])  # the one WAIT of the write (a broken connection: its error)
        return replies

    @staticmethod
    def _raise_refused(replicas: Any) -> None:
        if isinstance(replicas, ResponseError):
            raise replicas

    def _acknowledged(self, replicas: Any) -> None:
        if not isinstance(replicas, ResponseError) and int(replicas) < self.wait_replicas:
            self.wait_short += 1
            log.warning("redis %s:%s: a write reached %s of %d replicas within %d ms (kept: it stands on the "
                        "primary; a failover now could lose it)", self.host, self.port, replicas, self.wait_replicas,
                        self.wait_timeout_ms)

    async def _connection(self) -> _Connection:
        if self._closed:
            raise RedisConnectionError("the script client is closed")
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.ensure_future(self._connect())
        # Shielded: a cancelled caller does not cancel the connect the other callers wait for.
        return await asyncio.shield(task)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self.scheme == "unix":
                opening = loop.create_unix_connection(lambda: _Connection(loop, self.timeout), self.path)
            else:
                context = ssl.create_default_context() if self.scheme == "rediss" else None
                opening = loop.create_connection(lambda: _Connection(loop, self.timeout), self.host, self.port,
                                                 ssl=context)
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await opening
        except TimeoutError:
            raise RedisTimeoutError(f"connecting to redis timed out after {self.connect_timeout} s") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to redis: {exc}") from exc
        greeting = []
        if self.password is not None:
            greeting.append(command("AUTH", *([self.username] if self.username else []), self.password))
        if self.db:
            greeting.append(command("SELECT", self.db))
        for reply in await asyncio.gather(*(conn.send(p) for p in greeting), return_exceptions=True):
            if isinstance(reply, BaseException):
                conn._break(RedisConnectionError(f"redis refused the connection setup: {reply}"))
                raise conn.broken  # type: ignore[misc]
        if self._closed:
            conn._break(RedisConnectionError("the script client is closed"))
            raise conn.broken  # type: ignore[misc]
        conn.wait_command = command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        conn.wait_timeout_s = self.wait_timeout_ms / 1000
        conn.on_wait = self._acknowledged
        self._conn = conn
        return conn

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.broken = conn.broken or RedisConnectionError("the script client is closed")
            conn.transport.close()
            conn._fail_pending()
