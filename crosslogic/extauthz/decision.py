"""From an HTTP request (path, headers, body) to an authorisation decision. No gRPC here."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field

from crosslogic import errors
from crosslogic.contract import AUTHORIZATION_HEADER, REQUEST_ID_HEADER, AuthzMeta, Header, route_key
from crosslogic.extauthz.billcap import BillCapGuard
from crosslogic.extauthz.catalog import ModelCatalogue
from crosslogic.extauthz.identity import Identity, IdentityResolver
from crosslogic.extauthz.validation import Endpoint, ModelSpec, RequestFacts, endpoint_for, validate_request
from crosslogic.keys import hash_api_key, looks_like_api_key
from crosslogic.ratelimit.gate import AdmissionGate, LimiterUnavailable
from crosslogic.ratelimit.protocol import ratelimit_headers, refusal, refusal_headers
from crosslogic.ratelimit.quota import QuotaGuard

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


def _check_status(identity: Identity) -> None:
    for level, status in (("organization", identity.org_status), ("environment", identity.env_status),
                          ("API key", identity.key_status)):
        if status == "suspended":
            raise errors.tenant_suspended(level)
    if identity.key_status != "active":
        raise errors.invalid_api_key()


def _validated(endpoint: Endpoint, body: bytes, models: dict[str, ModelSpec],
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
    def __init__(self, resolver: IdentityResolver, catalogue: ModelCatalogue, secret: bytes,
                 default_region: str, quotas: QuotaGuard | None = None, caps: BillCapGuard | None = None,
                 gate: AdmissionGate | None = None) -> None:
        # Rate-limit admission (crosslogic.ratelimit.gate), made here so a request costs one Python hop;
        # None when Envoy's ratelimit filter calls `crosslogic serve ratelimit` instead (admission "rls").
        self.gate = gate
        self.quotas = quotas  # token quotas per day / hour (crosslogic.ratelimit.quota)
        self.caps = caps  # monthly bill caps (crosslogic.extauthz.billcap)
        self.resolver = resolver
        self.catalogue = catalogue
        self.secret = secret
        self.default_region = default_region

    async def decide(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Allowed:
        """Raises ClientError (or Refused) for every refusal; returns what to tell Envoy otherwise."""
        token = _bearer_token(headers)
        if token is None:
            raise errors.missing_api_key()
        if not looks_like_api_key(token):
            raise errors.invalid_api_key()
        identity = await self.resolver.resolve(hash_api_key(self.secret, token))
        if identity is None:
            raise errors.invalid_api_key()
        _check_status(identity)

        out: dict[str, str] = {Header.ORG: identity.org_id, Header.ENV: identity.env_id, Header.KEY: identity.key_id}
        metadata: dict[str, object] = {AuthzMeta.ORG_ID: identity.org_id, AuthzMeta.ENV_ID: identity.env_id,
                                       AuthzMeta.KEY_ID: identity.key_id}
        endpoint = endpoint_for(path)
        if endpoint is not None and method == "POST":
            models = await self.catalogue.current()
            facts = _validated(endpoint, body, models, frozenset(identity.allowed_models))
            if self.quotas is not None:  # the per-request token cap applies to every choice's tokens
                await self.quotas.check(identity.org_id, identity.env_id, len(body), facts.completion_budget)
            region = identity.region or self.default_region
            lane = identity.org_id if identity.org_id in self.catalogue.reserved_orgs else None
            route = route_key(region, facts.model, lane)
            out.update({Header.MODEL: facts.model, Header.REGION: region, Header.ROUTE: route,
                        Header.USAGE_MODE: _usage_mode(facts)})
            metadata.update({AuthzMeta.MODEL: facts.model, AuthzMeta.REGION: region,
                             AuthzMeta.ENDPOINT: endpoint.label, AuthzMeta.STREAMED: facts.stream,
                             AuthzMeta.MAX_TOKENS: facts.max_tokens, AuthzMeta.PROMPT_ESTIMATE: facts.prompt_estimate,
                             # what crosslogic.ratelimit reserves: the prompt once, plus max_tokens for
                             # each of the n (best_of) sequences (a string: Envoy's rate-limit metadata
                             # action reads string values)
                             AuthzMeta.RESERVE: str(facts.reserve)})
        response_headers: dict[str, str] = {}
        request_id = headers.get(REQUEST_ID_HEADER, "")
        if AuthzMeta.RESERVE in metadata and self.caps is not None:  # the request's maximum cost, against the bill cap
            if not request_id:
                raise errors.service_unavailable()
            await self.caps.reserve(identity.org_id, facts.model, region, request_id, facts.prompt_estimate,
                                    facts.completion_budget)
        if AuthzMeta.RESERVE in metadata and self.gate is not None:
            response_headers = await self._admit(identity, region, request_id,
                                                 facts.reserve, metadata)
        remove = tuple(h for h in headers if h not in out and h not in FORWARDED_HEADERS and not h.startswith(":"))
        return Allowed(headers=out, remove=remove, metadata=metadata,
                       response_headers=response_headers)

    async def _admit(self, identity: Identity, region: str, request_id: str, reserve: int,
                     metadata: dict[str, object]) -> dict[str, str]:
        """The reservation the RLS descriptor would carry, keyed by Envoy's x-request-id (settlement uses the
        same id). Last step of the decision: nothing after it can refuse, so no reservation is left behind."""
        if not request_id:  # Envoy always sets it (preserve_external_request_id: false)
            raise errors.service_unavailable()
        try:
            decision = await self.gate.decide(identity.org_id, identity.env_id, identity.key_id, region,
                                              request_id, reserve)
        except LimiterUnavailable:
            await self._release_money(identity.org_id, request_id)
            raise Refused(errors.service_unavailable(), {}, metadata) from None
        if not decision.admitted:
            await self._release_money(identity.org_id, request_id)
            raise Refused(refusal(decision), refusal_headers(decision), metadata)
        if decision.leases:
            # usage.lua frees the leases as the response ends (extauthz/release.py), not ~100 ms later at
            # settlement; requests that took none cost no release call.
            metadata[AuthzMeta.LEASE] = request_id
        return ratelimit_headers(decision)

    async def _release_money(self, org_id: str, request_id: str) -> None:
        """A refused request gives its bill-cap reservation back at once (its ledger row would, later)."""
        if self.caps is not None:
            await self.caps.release(org_id, request_id)
