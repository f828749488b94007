"""Coalesces concurrent calls of one Lua script into pipelined round trips (auto-pipelining).

Under load the ext_authz process holds many Check calls at once and each reserves with its own EVALSHA.
Calls made in the same event-loop turn now share one pipeline: one write, one read, and the client's
per-call overhead paid once per batch. A lone call (no concurrency) goes out directly, as before, so
latency at low load does not change. Measured in bench/limiter.py.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from crosslogic.ratelimit.lua import LuaScript, cluster_calls, on_cluster

Call = tuple[list[str], list, asyncio.Future]


class ScriptBatcher:
    def __init__(self, redis: aioredis.Redis, script: LuaScript, max_batch: int = 256) -> None:
        self.redis = redis
        self.script = script
        self.max_batch = max_batch
        self._pending: list[Call] = []
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, keys: list[str], args: list) -> list:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after the callbacks already queued: their calls join this batch
        self._pending.append((keys, args, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[Call]) -> None:
        try:
            if len(batch) == 1:
                keys, args, _ = batch[0]
                results: list = [await self.script(self.redis, keys, args)]
            else:
                results = await self._pipelined(batch)
        except Exception as exc:  # noqa: BLE001 - handed to every caller, who decides (e.g. fail-open)
            results = [exc] * len(batch)
        for (_, _, future), out in zip(batch, results, strict=True):
            if future.done():  # the caller was cancelled (e.g. Envoy gave up on the Check)
                continue
            if isinstance(out, BaseException):
                future.set_exception(out)
            else:
                future.set_result(out)

    async def _pipelined(self, batch: list[Call]) -> list:
        if on_cluster(self.redis):
            return await cluster_calls(self.redis, self.script, [(keys, args) for keys, args, _ in batch],
                                       raise_on_error=False)
        sha = await self.script.load(self.redis)
        results = await self._execute(sha, batch)
        missing = [i for i, out in enumerate(results) if isinstance(out, NoScriptError)]
        if missing:  # Redis restarted without its script cache: nothing of those ran, run them again
            sha = await self.script.load(self.redis, again=True)
            for i, out in zip(missing, await self._execute(sha, [batch[i] for i in missing]), strict=True):
                results[i] = out
        return results

    async def _execute(self, sha: str, batch: list[Call]) -> list:
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)
