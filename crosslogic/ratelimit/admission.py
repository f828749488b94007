"""One request's admission across the scopes: tenant, then reserved lane or platform.

1. Tenant scope (org, env, key): refusal -> 429 rate_limit_exceeded.
2. If the platform (global / region) limits anything: an org with reserved capacity first tries its
   lane; traffic within it bypasses the platform layers (seed §17). Otherwise, or above the lane, the
   platform scope decides; its refusal sheds the request (429 server_busy, seed §28). A refused request
   consumes nothing in any scope.
On one Valkey all of it is one script call (reserve.lua runs the stages in this order). With
`split_scopes` (Redis Cluster) each scope is a call of its own and a platform refusal rolls the tenant
reservation back.
Settlement names the same scopes in the same order, so one call settles the request everywhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from crosslogic.contract import LIMIT_KINDS
from crosslogic.ratelimit.engine import (
    LANE,
    NEED,
    SHARED,
    SKIP,
    Decision,
    Limiter,
    Scope,
    Stage,
    lane_scope,
    platform_scope,
    tenant_scope,
)
from crosslogic.ratelimit.limits import LayerLimits, PlatformLimits, TenantLimits

CONCURRENCY = LIMIT_KINDS[4]  # "concurrency": the limit kind whose refusals admit() retries
# A released or settled lease shows up on the next try: first after 10 ms, then doubling (10, 20, 40, 80, 160 ms):
# at most 10 script calls for a refusal within the default 1 s, so a client flooding at its limit costs Valkey
# a few calls per request, not one per millisecond.
CONCURRENCY_FIRST_PAUSE_S, CONCURRENCY_MAX_PAUSE_S = 0.01, 0.16


def request_scopes(org_id: str, env_id: str, key_id: str, region: str) -> tuple[Scope, Scope, Scope]:
    """Every scope a request may be reserved in, in the scripts' order: tenant, lane, platform."""
    return tenant_scope(org_id, env_id, key_id), lane_scope(org_id), platform_scope(region)


def stages(org_id: str, env_id: str, key_id: str, region: str, tenant: TenantLimits,
           platform: PlatformLimits) -> list[Stage]:
    tenant_s, lane_s, platform_s = request_scopes(org_id, env_id, key_id, region)
    shared = platform.limited(region)
    lane = tenant.lane()
    return [Stage(tenant_s, tenant.layers(), NEED),
            Stage(lane_s, (lane or LayerLimits(),), LANE if shared and lane else SKIP),
            Stage(platform_s, platform.for_region(region), SHARED if shared else SKIP)]


def _one_call(org_id: str, env_id: str, key_id: str, region: str, tenant: TenantLimits,
              platform: PlatformLimits) -> list[Stage]:
    plan = stages(org_id, env_id, key_id, region, tenant, platform)
    while plan[-1].role == SKIP:  # trailing skipped scopes only lengthen the call (settling tolerates it)
        plan.pop()
    return plan


async def admit(limiter: Limiter, org_id: str, env_id: str, key_id: str, region: str, request_id: str,
                tokens: int, tenant: TenantLimits, platform: PlatformLimits) -> Decision:
    """One admission; a concurrency refusal is retried, backing off, for up to `limiter.concurrency_wait_ms`: the
    set may be full of leases of requests that already ended, which settlement is about to free (reserve.lua)."""
    decision = await _admit_once(limiter, org_id, env_id, key_id, region, request_id, tokens, tenant, platform)
    deadline = time.monotonic() + limiter.concurrency_wait_ms / 1000
    pause = CONCURRENCY_FIRST_PAUSE_S
    while not decision.admitted and decision.kind == CONCURRENCY and time.monotonic() + pause <= deadline:
        await asyncio.sleep(pause)
        pause = min(2 * pause, CONCURRENCY_MAX_PAUSE_S)
        decision = await _admit_once(limiter, org_id, env_id, key_id, region, request_id, tokens, tenant, platform)
    return decision


async def _admit_once(limiter: Limiter, org_id: str, env_id: str, key_id: str, region: str, request_id: str,
                      tokens: int, tenant: TenantLimits, platform: PlatformLimits) -> Decision:
    if not limiter.split_scopes:
        # The call's plan is worked out once per tenant, region and limits (Limiter.plan), not per request.
        plan = limiter.plan((org_id, env_id, key_id, region), tenant, platform,
                            lambda: _one_call(org_id, env_id, key_id, region, tenant, platform))
        return await limiter.reserve_plan(plan, request_id, tokens)
    return await _admit_scope_by_scope(limiter, stages(org_id, env_id, key_id, region, tenant, platform), request_id,
                                       tokens)


async def _admit_scope_by_scope(limiter: Limiter, plan: list[Stage], request_id: str, tokens: int) -> Decision:
    first, *later = plan
    decision = await limiter.reserve_stages([first], request_id, tokens)
    if not decision.admitted or decision.repeated:
        return decision
    for stage in later:
        if stage.role == SKIP:
            continue
        answer = await limiter.reserve_stages([replace(stage, role=NEED)], request_id, tokens)
        if answer.admitted:
            decision = replace(decision, leases=decision.leases + answer.leases,
                               release_early=decision.release_early or answer.release_early)
            if answer.shadow_layer and not decision.shadow_layer:
                decision = replace(decision, shadow_layer=answer.shadow_layer, shadow_kind=answer.shadow_kind)
            if stage.role == LANE:
                return decision
            continue
        if stage.role == LANE:
            continue
        await limiter.settle_stages([first.scope], request_id, 0, rollback=True)
        # The client sees its own limits in the headers, never the platform's capacity.
        return replace(answer, buckets=decision.buckets)
    return decision


def settlement_calls(limiter: Limiter, org_id: str, env_id: str, key_id: str, region: str
                     ) -> tuple[list[Scope], list[list[Scope]]]:
    """(the call that settles the tenant, the calls to make once it did): one call on one Valkey."""
    scopes = list(request_scopes(org_id, env_id, key_id, region))
    if not limiter.split_scopes:
        return scopes, []
    return scopes[:1], [[scope] for scope in scopes[1:]]


async def settle(limiter: Limiter, org_id: str, env_id: str, key_id: str, region: str, request_id: str,
                 actual_tokens: int) -> bool:
    """Settles the request in every scope it was reserved in; True if it settled now (not before)."""
    first, then = settlement_calls(limiter, org_id, env_id, key_id, region)
    settled = await limiter.settle_stages(first, request_id, actual_tokens)
    if settled:
        for scopes in then:
            await limiter.settle_stages(scopes, request_id, actual_tokens)
    return settled


async def release_leases(limiter: Limiter, org_id: str, env_id: str, key_id: str, region: str,
                         request_id: str) -> int:
    """Frees the request's concurrency leases in every scope, tokens untouched (settlement still settles them
    exactly once); idempotent. Returns how many leases were freed now."""
    first, then = settlement_calls(limiter, org_id, env_id, key_id, region)
    freed = 0
    for scopes in (first, *then):
        freed += await limiter.release_leases(scopes, request_id)
    return freed
