"""Redis clients from the settings: one server, a Redis / Valkey Cluster (CROSSLOGIC_REDIS_CLUSTER), or a primary
found through its Sentinels (a `redis+sentinel://` URL, sentinel_url.py).

Through Sentinel, redis-py's Sentinel-managed pool asks the Sentinels for the primary on every new connection and
drops a connection that meets READONLY (its server was demoted), and the lean ScriptClient does the same itself
(resp.py): a failover costs the calls in flight their answer, as a dead server does, and nothing else.

On a cluster, redis-py's cluster client carries the settlement pipelines, quota counters and bill-cap scripts (it
routes each command by its key's hash slot and follows MOVED/ASK), and the lean ClusterScriptClient the per-request
reserve and release calls. Every multi-key command and script of ours names keys of one hash tag (engine.py).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from crosslogic.ratelimit.resp import ScriptClient
from crosslogic.ratelimit.resp_cluster import ClusterScriptClient
from crosslogic.ratelimit.sentinel_url import is_sentinel_url, parse_sentinel_url

# What "Redis cannot answer now" raises: a reset socket (OSError), redis-py's errors, and its cluster client's
# RedisClusterException (no node could map the slots, e.g. while a primary fails over), which is no RedisError.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (OSError, RedisError, RedisClusterException)


def redis_client(url: str, cluster: bool, *, connect_timeout: float, timeout: float,
                 request_path: bool = False) -> aioredis.Redis:
    """`request_path`: a call fails fast (one retry) while a primary fails over, so the caller's failure policy
    answers within ext_authz's timeout instead of redis-py's default retries (3, 0.25 s apart) timing it out."""
    if cluster:
        retry = Retry(ExponentialBackoff(cap=0.05, base=0.01), 1) if request_path else None
        return RedisCluster.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout,
                                     **({"retry": retry} if retry else {}))
    if is_sentinel_url(url):
        return _sentinel_client(url, connect_timeout=connect_timeout, timeout=timeout)
    return aioredis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout)


class _SentinelRedis(aioredis.Redis):
    """The primary's client; closing it closes the Sentinel clients it asks too (redis-py leaves them open)."""

    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel is not None:
            await self.sentinel.aclose()


def _sentinel_client(url: str, *, connect_timeout: float, timeout: float) -> aioredis.Redis:
    parsed = parse_sentinel_url(url)
    sockets = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout}
    auth = {"username": parsed.sentinel_username, "password": parsed.sentinel_password}
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs={**sockets, **auth}, **sockets)
    client = sentinel.master_for(parsed.master, redis_class=_SentinelRedis, db=parsed.db,
                                 username=parsed.username, password=parsed.password)
    client.sentinel = sentinel
    return client


def script_client(url: str, cluster: bool, *, connect_timeout: float, timeout: float, wait_replicas: int = 0,
                  wait_timeout_ms: int = 50) -> ScriptClient | ClusterScriptClient:
    """`wait_replicas`: durable calls (reserve, settle) wait for that many replicas (resp.py)."""
    make = ClusterScriptClient if cluster else ScriptClient
    return make(url, connect_timeout=connect_timeout, timeout=timeout, wait_replicas=wait_replicas,
                wait_timeout_ms=wait_timeout_ms)
