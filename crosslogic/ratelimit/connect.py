"""Redis clients from the settings: one server, or a Redis / Valkey Cluster (CROSSLOGIC_REDIS_CLUSTER).

On a cluster, redis-py's cluster client carries the settlement pipelines, quota counters and bill-cap scripts (it
routes each command by its key's hash slot and follows MOVED/ASK), and the lean ClusterScriptClient the per-request
reserve and release calls. Every multi-key command and script of ours names keys of one hash tag (engine.py).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from crosslogic.ratelimit.resp import ScriptClient
from crosslogic.ratelimit.resp_cluster import ClusterScriptClient

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
    return aioredis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout)


def script_client(url: str, cluster: bool, *, connect_timeout: float, timeout: float, wait_replicas: int = 0,
                  wait_timeout_ms: int = 50) -> ScriptClient | ClusterScriptClient:
    """`wait_replicas`: durable calls (reserve, settle) wait for that many replicas (resp.py)."""
    make = ClusterScriptClient if cluster else ScriptClient
    return make(url, connect_timeout=connect_timeout, timeout=timeout, wait_replicas=wait_replicas,
                wait_timeout_ms=wait_timeout_ms)
