"""A Lua script called by SHA: loaded once, loaded again when Redis answers NOSCRIPT (e.g. after a restart)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError


def script_source(name: str, prelude: str | None = "buckets.lua") -> str:
    """A script as sent to Redis: the shared prelude (Lua scripts cannot import), if any, then the script."""
    scripts = resources.files("crosslogic.ratelimit") / "scripts"
    return ((scripts / prelude).read_text() if prelude else "") + (scripts / name).read_text()


class LuaScript:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None

    async def load(self, redis: aioredis.Redis, again: bool = False) -> str:
        if self.sha is None or again:
            self.sha = await redis.script_load(self.source)
        return self.sha

    async def __call__(self, redis: aioredis.Redis, keys: list[str], args: list) -> list:
        sha = await self.load(redis)
        try:
            return await redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.evalsha(await self.load(redis, again=True), len(keys), *keys, *args)


def on_cluster(redis: aioredis.Redis) -> bool:
    return isinstance(redis, RedisCluster)


async def cluster_calls(redis: aioredis.Redis, script: LuaScript, calls: Sequence[tuple[Sequence, Sequence]],
                        raise_on_error: bool = True) -> list:
    """Many calls of one script on a Redis Cluster, concurrently (redis-py's cluster pipeline refuses EVALSHA):
    each goes to its own slot's primary; a primary without the script (promoted since) gets it loaded again."""
    return list(await asyncio.gather(*(script(redis, list(keys), list(args)) for keys, args in calls),
                                     return_exceptions=not raise_on_error))
