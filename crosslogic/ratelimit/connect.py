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

from crosslogic.ratelimit.resp import ScriptClient
from crosslogic.ratelimit.resp_cluster import ClusterScriptClient


def redis_client(url: str, cluster: bool, *, connect_timeout: float, timeout: float,
                 request_path: bool = False) -> aioredis.Redis:
    """`request_path`: a call fails fast (one retry) while a primary fails over, so the caller's failure policy
    answers within ext_authz's timeout instead of redis-py's default retries (3, 0.25 s apart) timing it out."""
    if cluster:
        retry = Retry(ExponentialBackoff(cap=0.05, base=0.01), 1) if request_path else None
        return RedisCluster.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout,
                                     **({"retry": retry} if retry else {}))
    return aioredis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout)


def script_client(url: str, cluster: bool, *, connect_timeout: float,
                  timeout: float) -> ScriptClient | ClusterScriptClient:
    if cluster:
        return ClusterScriptClient(url, connect_timeout=connect_timeout, timeout=timeout)
    return ScriptClient(url, connect_timeout=connect_timeout, timeout=timeout)
