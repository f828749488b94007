"""The lean script client (resp.py) on a Redis / Valkey Cluster: one pipelined ScriptClient per primary, each call
sent to the primary of its first key's hash slot.

The limiter's keys are designed for this (engine.py): every key of one script call carries the same hash tag, so a
call never spans slots. What the cluster says is followed as Redis Cluster clients must:
- MOVED <slot> <host:port>: the slot lives elsewhere now (a failover, a resharding): the call goes there and the
  whole slot map is read again (CLUSTER SLOTS) in the background.
- ASK <slot> <host:port>: the slot is being migrated and this key already moved: ASKING + the call, once, there.
- CLUSTERDOWN / TRYAGAIN, or the primary does not answer (it died; its replica takes over after the cluster's node
  timeout): the map is read again and the call retried with a short backoff, within `retry_s`; then the error goes
  to the caller, whose failure policy decides (fail-open, or 503) as on one Valkey.
Durable calls (reserve, settle) are followed by WAIT on their primary's connection (resp.py), one per write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from crosslogic.ratelimit.lua import LuaScript
from crosslogic.ratelimit.resp import Arg, Encoded, ScriptClient, _encoded, command

SLOTS = 16384
Address = tuple[str, int]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_slots(reply: list) -> list[tuple[int, int, Address]]:
    """CLUSTER SLOTS -> (first slot, last slot, primary address) per range."""
    ranges = []
    for entry in reply:
        host = _text(entry[2][0]) or "127.0.0.1"
        ranges.append((int(entry[0]), int(entry[1]), (host, int(entry[2][1]))))
    return ranges


def _redirect(error: str) -> tuple[str, int, Address] | None:
    parts = error.split()
    if len(parts) == 3 and parts[0] in ("MOVED", "ASK"):
        host, _, port = parts[2].rpartition(":")
        return parts[0], int(parts[1]), (host or "127.0.0.1", int(port))
    return None


class ClusterScriptClient:
    """The ScriptClient interface (evalsha, execute, aclose) over a cluster; `url` names any one node."""

    def __init__(self, url: str, *, connect_timeout: float = 0.5, timeout: float = 0.5, retry_s: float = 0.4,
                 max_redirects: int = 5, wait_replicas: int = 0, wait_timeout_ms: int = 50) -> None:
        parsed = urlparse(url)
        self._template = parsed  # scheme, credentials and db of every node's URL
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retry_s = retry_s
        self.max_redirects = max_redirects
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._seeds: list[Address] = [(parsed.hostname or "127.0.0.1", parsed.port or 6379)]
        self._slots: list[Address | None] = [None] * SLOTS
        self._clients: dict[Address, ScriptClient] = {}
        self._refreshing: asyncio.Task | None = None
        self._closed = False

    def _client(self, address: Address) -> ScriptClient:
        client = self._clients.get(address)
        if client is None:
            t = self._template
            auth = t.netloc.rpartition("@")[0]
            url = f"{t.scheme}://{auth + '@' if auth else ''}{address[0]}:{address[1]}"
            client = self._clients[address] = ScriptClient(
                url, connect_timeout=self.connect_timeout, timeout=self.timeout, wait_replicas=self.wait_replicas,
                wait_timeout_ms=self.wait_timeout_ms)
        return client

    async def _read_slots(self) -> None:
        known = list(dict.fromkeys([*self._seeds, *self._clients]))
        last: BaseException | None = None
        for address in known:
            try:
                reply = await self._client(address).execute("CLUSTER", "SLOTS")
            except RedisError as exc:
                last = exc
                continue
            slots: list[Address | None] = [None] * SLOTS
            for first, end, primary in parse_slots(reply):
                slots[first:end + 1] = [primary] * (end - first + 1)
            self._slots = slots
            self._seeds = list(dict.fromkeys([*(a for a in slots if a), *self._seeds]))
            return
        raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS ({last})")

    async def refresh(self) -> None:
        """Reads the slot map again (one reader at a time; callers share its result)."""
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.ensure_future(self._read_slots())
        await asyncio.shield(task)

    def _refresh_soon(self) -> None:
        """A background read of the map, unless one is under way (a burst of MOVED replies starts one)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_slots())
            self._refreshing.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _primary(self, slot: int) -> ScriptClient:
        address = self._slots[slot]
        if address is None:
            await self.refresh()
            address = self._slots[slot]
            if address is None:
                raise RedisConnectionError(f"no primary serves hash slot {slot} (CLUSTERDOWN)")
        return self._client(address)

    @property
    def wait_short(self) -> int:
        return sum(client.wait_short for client in self._clients.values())

    async def evalsha_many(self, script: LuaScript,
                           calls: Sequence[tuple[Sequence[Arg | Encoded], Sequence[Arg | Encoded]]],
                           durable: bool = False) -> list[Any]:
        """Many calls, each to its slot's primary; the calls bound for one primary share its write (and WAIT)."""
        return list(await asyncio.gather(*(self.evalsha(script, keys, args, durable) for keys, args in calls)))

    async def evalsha(self, script: LuaScript, keys: Sequence[Arg | Encoded], args: Sequence[Arg | Encoded],
                      durable: bool = False) -> Any:
        first = keys[0]
        if isinstance(first, Encoded):
            raise TypeError("the first key must be plain: it names the call's hash slot")
        slot = key_slot(first if isinstance(first, bytes) else str(first).encode())
        deadline = time.monotonic() + self.retry_s
        backoff = 0.02
        for _ in range(self.max_redirects + 8):
            client = await self._primary(slot)
            try:
                return await client.evalsha(script, keys, args, durable)
            except ResponseError as exc:
                redirect = _redirect(str(exc))
                if redirect is not None:
                    kind, moved_slot, address = redirect
                    if kind == "MOVED":
                        self._slots[moved_slot] = address
                        self._refresh_soon()
                        continue
                    return await self._asking(address, script, keys, args)
                if not str(exc).startswith(("CLUSTERDOWN", "TRYAGAIN")) or time.monotonic() > deadline:
                    raise
            except (RedisConnectionError, RedisTimeoutError):
                # The primary died or is cut off: its replica is promoted after the cluster's node timeout.
                if time.monotonic() + backoff > deadline:
                    raise
                self._refresh_soon()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.2)
        raise RedisConnectionError(f"hash slot {slot}: too many redirections")

    async def _asking(self, address: Address, script: LuaScript, keys: Sequence[Arg | Encoded],
                      args: Sequence[Arg | Encoded]) -> Any:
        """ASKING and the call back to back on one connection (the importing node takes it only so). EVAL with the
        source, not EVALSHA: the importing node may not hold the script yet."""
        client = self._client(address)
        key_count, _ = _encoded(keys)
        count, data = _encoded(["EVAL", script.source, key_count, *keys, *args])
        payload = b"*%d\r\n" % count + b"".join(data)
        asked, reply = await asyncio.gather(client._call(command("ASKING")), client._call(payload))
        for value in (asked, reply):
            if isinstance(value, ResponseError):
                raise value
        return reply

    async def execute(self, *parts: Arg) -> Any:
        """A command on the node of its first argument's slot after the command name (tests, PING)."""
        if len(parts) < 2:
            return await self._client(self._seeds[0]).execute(*parts)
        key = parts[1]
        return await (await self._primary(key_slot(key if isinstance(key, bytes) else str(key).encode()))).execute(
            *parts)

    async def aclose(self) -> None:
        self._closed = True
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        await asyncio.gather(*(client.aclose() for client in self._clients.values()))
