"""One request's admission across the scopes: tenant, then reserved lane or platform.

1. Tenant scope (org, env, key) in one atomic call: refusal -> 429 rate_limit_exceeded.
2. If the platform (global / region) limits anything: an org with reserved capacity first tries its
   lane; traffic within it bypasses the platform layers (seed §17). Otherwise, or above the lane, the
   platform scope decides; its refusal sheds the request (429 server_busy, seed §28) and the tenant
   reservation is rolled back, so a refused request consumes nothing.
Settlement calls every scope; a scope that holds no reservation for the request id ignores it.
"""

from __future__ import annotations

from dataclasses import replace

from crosslogic.ratelimit.engine import Decision, Limiter, lane_scope, platform_scope, tenant_scope
from crosslogic.ratelimit.limits import PlatformLimits, TenantLimits


async def admit(limiter: Limiter, org_id: str, env_id: str, key_id: str, region: str, request_id: str,
                tokens: int, tenant: TenantLimits, platform: PlatformLimits) -> Decision:
    scope = tenant_scope(org_id, env_id, key_id)
    decision = await limiter.reserve_scope(scope, request_id, tokens, tenant.layers())
    if not decision.admitted or decision.repeated or not platform.limited(region):
        return decision
    lane = tenant.lane()
    if lane is not None:
        in_lane = await limiter.reserve_scope(lane_scope(org_id), request_id, tokens, (lane,))
        if in_lane.admitted:
            return decision
    shared = await limiter.reserve_scope(platform_scope(region), request_id, tokens, platform.for_region(region))
    if shared.admitted:
        if shared.shadow_layer and not decision.shadow_layer:
            return replace(decision, shadow_layer=shared.shadow_layer, shadow_kind=shared.shadow_kind)
        return decision
    await limiter.settle_scope(scope, request_id, 0, rollback=True)
    # The client sees its own limits in the headers, never the platform's capacity.
    return replace(shared, buckets=decision.buckets)


async def settle(limiter: Limiter, org_id: str, env_id: str, key_id: str, region: str, request_id: str,
                 actual_tokens: int) -> bool:
    """Settles the request in every scope it was reserved in; True if the tenant scope settled now."""
    settled = await limiter.settle_scope(tenant_scope(org_id, env_id, key_id), request_id, actual_tokens)
    if settled:
        await limiter.settle_scope(lane_scope(org_id), request_id, actual_tokens)
        await limiter.settle_scope(platform_scope(region), request_id, actual_tokens)
    return settled
