"""Token quotas per day and per hour, for environments and orgs: checked by ext_authz (403), counted at settlement.
Also the per-request caps of an environment (body size -> 413, max_tokens -> 400).

The quota values come with ext_authz's per-key tenant view (extauthz/tenants.py selects `QUOTA_COLUMNS` in its
one join); only the usage counters live here, in Redis.

A quota is a spending cap over calendar periods (UTC day, UTC hour), not a rate: counters hold the
tokens really used (settled usage, so they agree with the ledger) in keys that expire after their
period. The check refuses once a counter reached its quota; requests already running when it is
crossed still finish, so a quota can be overshot by what was in flight at that moment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from crosslogic import errors
from crosslogic.ratelimit.connect import REDIS_UNAVAILABLE
from crosslogic.ratelimit.engine import org_tag
from crosslogic.ratelimit.resp import ScriptClient

log = logging.getLogger("crosslogic.ratelimit")
# Over ratelimit.store.TENANT_JOINS (orgs o, environments e, a test key's caps tk); named as the Quotas fields.
QUOTA_COLUMNS = """
o.quota_tokens_per_day AS org_day, o.quota_tokens_per_hour AS org_hour,
e.quota_tokens_per_day AS env_day, e.quota_tokens_per_hour AS env_hour,
e.max_request_bytes, LEAST(e.max_tokens_per_request, tk.max_tokens_per_request) AS max_tokens_per_request
"""
PERIOD_TTL_S = {"d": 2 * 86_400, "h": 2 * 3_600}
_LEVELS = {"org": "organization", "env": "environment"}
_PERIODS = {"d": "daily", "h": "hourly"}


@dataclass(frozen=True)
class Quotas:
    org_day: int | None = None
    org_hour: int | None = None
    env_day: int | None = None
    env_hour: int | None = None
    max_request_bytes: int | None = None
    max_tokens_per_request: int | None = None

    def limits(self) -> tuple[tuple[str, str, int | None], ...]:
        return (("org", "d", self.org_day), ("org", "h", self.org_hour),
                ("env", "d", self.env_day), ("env", "h", self.env_hour))

    @property
    def any(self) -> bool:
        return any(limit is not None for _, _, limit in self.limits())

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Quotas:
        """A row holding QUOTA_COLUMNS."""
        return cls(row["org_day"], row["org_hour"], row["env_day"], row["env_hour"], row["max_request_bytes"],
                   row["max_tokens_per_request"])


NO_QUOTAS = Quotas()


def quota_keys(org_id: str, env_id: str, at: datetime) -> list[str]:
    """Counters in the order of Quotas.limits(); one hash slot with the org's limiter keys."""
    tag = org_tag(org_id)
    day, hour = at.strftime("%Y%m%d"), at.strftime("%Y%m%d%H")
    return [f"{tag}:quota:org:{org_id}:d:{day}", f"{tag}:quota:org:{org_id}:h:{hour}",
            f"{tag}:quota:env:{env_id}:d:{day}", f"{tag}:quota:env:{env_id}:h:{hour}"]


def exceeded(quotas: Quotas, used: list[int]) -> tuple[str, str] | None:
    """(level, period) of the first quota that is used up, or None."""
    for (level, period, limit), spent in zip(quotas.limits(), used, strict=True):
        if limit is not None and spent >= limit:
            return level, period
    return None


def cap_violation(quotas: Quotas, body_bytes: int, completion_tokens: int) -> errors.ClientError | None:
    """`completion_tokens`: the most the request can generate, max_tokens for each of its n choices."""
    if quotas.max_request_bytes is not None and body_bytes > quotas.max_request_bytes:
        return errors.request_too_large()
    if quotas.max_tokens_per_request is not None and completion_tokens > quotas.max_tokens_per_request:
        return errors.invalid_request(f"max_tokens is limited to {quotas.max_tokens_per_request} completion tokens "
                                      f"per request for this key (max_tokens x n), and this request may "
                                      f"generate {completion_tokens}.", "max_tokens")
    return None


class QuotaCounters:
    """ext_authz's quota check: the usage counters in Redis against a tenant's quotas (one MGET, only for a
    tenant that has a quota; most have none and cost no Redis call)."""

    def __init__(self, redis: aioredis.Redis, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.redis = redis
        self.clock = clock

    async def check(self, org_id: str, env_id: str, quotas: Quotas) -> None:
        """Raises 403 quota_exceeded when a quota is used up. Redis down: quotas allow (logged)."""
        if not quotas.any:
            return
        try:
            values = await self.redis.mget(quota_keys(org_id, env_id, self.clock()))
        except REDIS_UNAVAILABLE as exc:
            log.warning("quota counters unavailable (%s): allowing", exc)
            return
        hit = exceeded(quotas, [int(v or 0) for v in values])
        if hit is not None:
            raise errors.quota_exceeded(_LEVELS[hit[0]], _PERIODS[hit[1]])


def count_usage_commands(usages: list[tuple[str, str, int, datetime]]) -> list[tuple[str, str, int]]:
    """The Redis commands that count settled requests (org, env, tokens, when) against their quotas: one
    INCRBY (the batch's sum) and one EXPIRE per counter, however many of the batch's requests it counts."""
    totals: dict[str, int] = {}
    for org_id, env_id, tokens, at in usages:
        if tokens > 0:
            for key in quota_keys(org_id, env_id, at):
                totals[key] = totals.get(key, 0) + tokens
    commands: list[tuple[str, str, int]] = []
    for key, tokens in totals.items():
        commands.append(("INCRBY", key, tokens))
        commands.append(("EXPIRE", key, PERIOD_TTL_S[key.rsplit(":", 2)[1]]))
    return commands


async def count_usage_many(redis: aioredis.Redis | ScriptClient, usages: list[tuple[str, str, int, datetime]]) -> None:
    """count_usage for many settled requests (org, env, tokens, when) in one round trip (either client)."""
    commands = count_usage_commands(usages)
    if not commands:
        return
    if isinstance(redis, ScriptClient):
        await redis.execute_many(commands)
        return
    async with redis.pipeline(transaction=False) as pipe:
        for name, key, value in commands:
            pipe.execute_command(name, key, value)
        await pipe.execute()

