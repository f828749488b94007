"""From an HTTP request (path, headers, body) to an authorisation decision. No gRPC or HTTP server here, and no
Postgres or Redis: what the decision needs comes in through the small Protocols below (the real parts are
wired in service.py; tests/test_decision.py drives every refusal with fakes)."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from crosslogic import errors
from crosslogic.contract import (
    AUTHORIZATION_HEADER,
    REQUEST_ID_HEADER,
    SITE_ORG_HEADER,
    AuthzMeta,
    Header,
    route_key,
)
from crosslogic.extauthz.billcap import Cap
from crosslogic.extauthz.tenants import TenantView
from crosslogic.extauthz.validation import Endpoint, ModelSpec, RequestFacts, endpoint_for, validate_request
from crosslogic.keys import hash_api_key, looks_like_api_key
from crosslogic.ratelimit.engine import Decision
from crosslogic.ratelimit.gate import LimiterUnavailable
from crosslogic.ratelimit.limits import PlatformLimits, TenantLimits
from crosslogic.ratelimit.protocol import ratelimit_headers, refusal, refusal_headers
from crosslogic.ratelimit.quota import Quotas, cap_violation


class TenantViews(Protocol):
    """Per-key views by key hash (tenants.TenantCache)."""

    async def view(self, key_hash: str) -> TenantView | None: ...  # None: no such key
    async def platform(self) -> PlatformLimits: ...


class Catalogue(Protocol):
    """The active models and the orgs with reserved lanes (catalog.ModelCatalogue)."""

    reserved_orgs: frozenset[str]

    async def current(self) -> Mapping[str, ModelSpec]: ...


class QuotaCheck(Protocol):
    """Usage counters against a tenant's quotas (ratelimit.quota.QuotaCounters): raises 403 quota_exceeded."""

    async def check(self, org_id: str, env_id: str, quotas: Quotas) -> None: ...


class LicenseCheck(Protocol):
    """Flat licences (license_guard.LicenseGuard): raises 403 / 429 when the org's licence does not admit this."""

    async def check(self, org_id: str, reserve_tokens: int) -> None: ...


class BillCap(Protocol):
    """Monthly bill caps (billcap.BillCapGuard): reserve raises 403/503, returns True when it holds money."""

    async def reserve(self, org_id: str, cap: Cap | None, model: str, region: str, request_id: str,
                      prompt_tokens: int, completion_tokens: int) -> bool: ...
    async def release(self, org_id: str, request_id: str) -> None: ...


class Admission(Protocol):
    """The token reservation in every limit layer (ratelimit.gate.AdmissionGate): raises LimiterUnavailable."""

    async def admit(self, org: str, env: str, key: str, region: str, request_id: str, reserve: int,
                    limits: TenantLimits, platform: PlatformLimits) -> Decision: ...


log = logging.getLogger("crosslogic.extauthz")
# What a node gets of the client's headers, besides the x-clp-* set here: framing, content negotiation, the
# request id. The rest (the key, cookies, SDK telemetry, accept-encoding, x-envoy-*, 60 KiB of padding) stays
# at the gateway: a node's header limits are smaller than Envoy's (the simulator's aiohttp: 8 KiB a line),
# compressed answers would hide usage from usage.lua, and the node has no use for any of it.
FORWARDED_HEADERS = frozenset({"host", "content-type", "content-length", "transfer-encoding", "accept",
                               "user-agent", REQUEST_ID_HEADER, "x-forwarded-for", "x-forwarded-proto"})


@dataclass(frozen=True)
class Allowed:
    headers: dict[str, str]  # set on the upstream request, overwriting anything the client sent
    remove: tuple[str, ...]  # client-sent headers that must not travel on
    metadata: dict[str, object] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)  # added to the client's response


class Refused(Exception):
    """A limiter refusal (429 with retry-after and x-ratelimit-*, or 503 when it cannot decide). It carries the
    request's metadata too, so the access log and the ledger record it as they did when the Envoy ratelimit
    filter refused after ext_authz had allowed (Envoy emits ext_authz metadata on denials as well)."""

    def __init__(self, error: errors.ClientError, headers: dict[str, str], metadata: dict[str, object]) -> None:
        super().__init__(error.message)
        self.error = error
        self.headers = headers
        self.metadata = metadata


def _bearer_token(headers: dict[str, str]) -> str | None:
    value = headers.get(AUTHORIZATION_HEADER, "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _check_status(view: TenantView, now: float) -> None:
    if view.key_expires_at is not None and view.key_expires_at <= now:
        raise errors.invalid_api_key()  # OpenAI has no "expired": a key past its time is simply not valid
    if view.org_status == "active" and view.env_status == "active" and view.key_status == "active":
        return
    for level, status in (("organization", view.org_status), ("environment", view.env_status),
                          ("API key", view.key_status)):
        if status == "suspended":
            raise errors.tenant_suspended(level)
    if view.key_status != "active":
        raise errors.invalid_api_key()


def _validated(endpoint: Endpoint, body: bytes, models: Mapping[str, ModelSpec],
               allowed: frozenset[str]) -> RequestFacts:
    """validate_request, with its last resort: it is a pure function of the client's body, so anything it raises
    besides ClientError is a bug meeting input we did not foresee. The client gets a 400 (its request cannot be
    served as sent; nothing failed on our side), the log one line naming the bug's place, no traceback."""
    try:
        return validate_request(endpoint, body, models, allowed)
    except errors.ClientError:
        raise
    except Exception as exc:  # noqa: BLE001 - the last resort, by design
        where = traceback.extract_tb(exc.__traceback__)[-1]
        log.error("request validation failed on unforeseen input (%s: %.200s at %s:%d); answered 400",
                  type(exc).__name__, exc, where.filename.rsplit("/", 1)[-1], where.lineno)
        raise errors.invalid_param("The request body could not be validated. Check it against the API "
                                   "reference.", None, None) from None


def _usage_mode(facts: RequestFacts) -> str:
    """How usage.lua shows a stream the node was asked to put cumulative usage on every chunk of: as sent
    (the client asked for vLLM's continuous_usage_stats), `"usage": null` on every chunk but the usage-only
    final one (include_usage, OpenAI's contract), or no usage anywhere (neither)."""
    if not facts.stream:
        return "json"
    if not facts.client_wants_usage:
        return "sse-strip"
    return "sse-keep" if facts.client_wants_continuous_usage else "sse-null"


class Authorizer:
    """The checks, in this order (each refusal ends the decision): bearer key present (401) and well formed
    (401) → known (401) → org, env, key not suspended (403) and the key active (401) → for a POST to an
    inference endpoint: the body valid and the model allowed (400 / 404) → the environment's per-request caps
    (413 / 400) → quotas (403) → bill cap (403 / 503) → rate limits (429 / 503; a refusal gives the bill-cap
    reservation back). Any other request (GET /v1/models) is allowed with the identity headers only."""

    def __init__(self, views: TenantViews, catalogue: Catalogue, secret: bytes, default_region: str,
                 quotas: QuotaCheck | None = None, caps: BillCap | None = None,
                 gate: Admission | None = None, wall_clock: Callable[[], float] = time.time,
                 license: LicenseCheck | None = None) -> None:
        self.views = views
        self.license = license  # air-gapped installs: the org's signed licence (extauthz/license_guard.py)
        self.wall_clock = wall_clock  # key expiry (a view is cached; the clock decides when it expired)
        self.catalogue = catalogue
        self.secret = secret
        self.default_region = default_region
        self.quotas = quotas  # token quotas per day / hour (crosslogic.ratelimit.quota)
        self.caps = caps  # monthly bill caps (crosslogic.extauthz.billcap)
        # Rate-limit admission (crosslogic.ratelimit.gate), made here so a request costs one Python hop;
        # None when Envoy's ratelimit filter calls `crosslogic serve ratelimit` instead (admission "rls").
        self.gate = gate

    async def decide(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Allowed:
        """Raises ClientError (or Refused) for every refusal; returns what to tell Envoy otherwise."""
        token = _bearer_token(headers)
        if token is None:
            raise errors.missing_api_key()
        if not looks_like_api_key(token):
            raise errors.invalid_api_key()
        view = await self.views.view(hash_api_key(self.secret, token))
        if view is None:
            raise errors.invalid_api_key()
        _check_status(view, self.wall_clock())
        site_org = headers.get(SITE_ORG_HEADER)
        if site_org and site_org != view.org_id:  # a site gateway serves its own org only (docs/sites.md)
            raise errors.wrong_site()

        out: dict[str, str] = {Header.ORG: view.org_id, Header.ENV: view.env_id, Header.KEY: view.key_id}
        metadata: dict[str, object] = {AuthzMeta.ORG_ID: view.org_id, AuthzMeta.ENV_ID: view.env_id,
                                       AuthzMeta.KEY_ID: view.key_id}
        response_headers: dict[str, str] = {}
        endpoint = endpoint_for(path)
        if endpoint is not None and method == "POST":
            facts = _validated(endpoint, body, await self.catalogue.current(), view.allowed_models)
            # The per-request token cap applies to every choice's tokens.
            violation = cap_violation(view.quotas, len(body), facts.completion_budget)
            if violation is not None:
                raise violation
            if self.quotas is not None:
                await self.quotas.check(view.org_id, view.env_id, view.quotas)
            if self.license is not None:
                await self.license.check(view.org_id, facts.reserve)
            region = view.region or self.default_region
            lane = view.org_id if view.org_id in self.catalogue.reserved_orgs else None
            out.update({Header.MODEL: facts.model, Header.REGION: region, Header.ROUTE: route_key(region, facts.model,
                                                                                                  lane),
                        Header.USAGE_MODE: _usage_mode(facts)})
            metadata.update({AuthzMeta.MODEL: facts.model, AuthzMeta.REGION: region,
                             AuthzMeta.ENDPOINT: endpoint.label, AuthzMeta.STREAMED: facts.stream,
                             AuthzMeta.MAX_TOKENS: facts.max_tokens, AuthzMeta.PROMPT_ESTIMATE: facts.prompt_estimate,
                             # what crosslogic.ratelimit reserves: the prompt once, plus max_tokens for
                             # each of the n (best_of) sequences (a string: Envoy's rate-limit metadata
                             # action reads string values)
                             AuthzMeta.RESERVE: str(facts.reserve)})
            if self.caps is not None or self.gate is not None:
                response_headers = await self._reserve(view, region, facts, headers.get(REQUEST_ID_HEADER, ""),
                                                       metadata)
        elif self.license is not None:  # reads (GET /v1/models) too: an unlicensed org gets nothing
            await self.license.check(view.org_id, 0)
        remove = tuple(h for h in headers if h not in out and h not in FORWARDED_HEADERS and not h.startswith(":"))
        return Allowed(headers=out, remove=remove, metadata=metadata, response_headers=response_headers)

    async def _reserve(self, view: TenantView, region: str, facts: RequestFacts, request_id: str,
                       metadata: dict[str, object]) -> dict[str, str]:
        """The bill-cap reservation (capped orgs only), then the tokens the RLS descriptor would carry, keyed by
        Envoy's x-request-id (settlement uses the same id). Last steps of the decision: nothing after them can
        refuse, so no reservation is left behind."""
        if not request_id:  # Envoy always sets it (preserve_external_request_id: false)
            raise errors.service_unavailable()
        platform = await self.views.platform() if self.gate is not None else None  # before anything is held
        holds_money = self.caps is not None and await self.caps.reserve(
            view.org_id, view.cap, facts.model, region, request_id, facts.prompt_estimate, facts.completion_budget)
        if self.gate is None or platform is None:
            return {}
        try:
            decision = await self.gate.admit(view.org_id, view.env_id, view.key_id, region, request_id,
                                             facts.reserve, view.limits, platform)
        except LimiterUnavailable:
            await self._release_money(holds_money, view.org_id, request_id)
            raise Refused(errors.service_unavailable(), {}, metadata) from None
        if not decision.admitted:
            await self._release_money(holds_money, view.org_id, request_id)
            raise Refused(refusal(decision), refusal_headers(decision), metadata)
        if decision.release_early:
            # usage.lua frees the leases as the response ends (extauthz/release.py), not ~0.1-0.3 s later at
            # settlement: only where a set is at least half full (reserve.lua); the others cost no release call.
            metadata[AuthzMeta.LEASE] = request_id
        return ratelimit_headers(decision)

    async def _release_money(self, holds_money: bool, org_id: str, request_id: str) -> None:
        """A refused request gives its bill-cap reservation back at once (its ledger row would, later)."""
        if holds_money and self.caps is not None:
            await self.caps.release(org_id, request_id)
