"""Limiter calls made through a Valkey failover the way ext_authz's next check and the Settler make them."""

from __future__ import annotations

import asyncio
import time

from crosslogic.ratelimit.connect import REDIS_UNAVAILABLE
from crosslogic.ratelimit.engine import ALREADY_SETTLED, SETTLED, Limiter, Scope


async def until_answered(call, deadline: float):
    """The call, retried while Redis is unavailable (a reset connection is an OSError) until `deadline`."""
    while True:
        try:
            return await call()
        except REDIS_UNAVAILABLE:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def settle_through_failover(limiter: Limiter, scopes: list[Scope], request_id: str, tokens: int,
                                  deadline: float) -> bool:
    """Settles one request, retrying through the failover; True if it settled exactly once as far as this caller
    can tell: SETTLED, or ALREADY_SETTLED after an attempt whose reply was lost (it landed before the primary
    died). Never "nothing reserved"; the caller checks the charge counter for exactness."""
    attempts = 0

    async def attempt():
        nonlocal attempts
        attempts += 1
        return await limiter.settle_many([(scopes, request_id, tokens)])

    status = (await until_answered(attempt, deadline))[0]
    return status == SETTLED or (status == ALREADY_SETTLED and attempts > 1)
