"""Authorizer.decide through its Protocol seams, with fakes: every refusal, the order of the checks, what an
allowed request carries. No Postgres, no Valkey (the integration tests drive the real parts)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from crosslogic import errors
from crosslogic.contract import AuthzMeta, Header
from crosslogic.extauthz.billcap import Cap
from crosslogic.extauthz.decision import Authorizer, Refused
from crosslogic.extauthz.tenants import TenantView
from crosslogic.extauthz.validation import ModelSpec
from crosslogic.keys import generate_api_key, hash_api_key
from crosslogic.ratelimit.engine import BucketView, Decision
from crosslogic.ratelimit.gate import LimiterUnavailable
from crosslogic.ratelimit.limits import UNLIMITED, PlatformLimits
from crosslogic.ratelimit.quota import NO_QUOTAS, Quotas

SECRET = b"unit-secret"
KEY = generate_api_key()
VIEW = TenantView(key_id="k1", org_id="o1", env_id="e1", key_status="active", env_status="active",
                  org_status="active", region="eu-central", allowed_models=frozenset(), limits=UNLIMITED,
                  quotas=NO_QUOTAS, cap=None)
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
ADMITTED = Decision(admitted=True, buckets=(BucketView("key", "requests_per_min", 10, 9),))


class Calls(list):
    """What the fakes were asked, in order."""


class FakeViews:
    def __init__(self, calls: Calls, views: dict[str, TenantView]) -> None:
        self.calls, self.views, self.platform_limits = calls, views, PlatformLimits()

    async def view(self, key_hash: str) -> TenantView | None:
        self.calls.append("view")
        return self.views.get(key_hash)

    async def platform(self) -> PlatformLimits:
        self.calls.append("platform")
        return self.platform_limits


class FakeCatalogue:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.reserved_orgs: frozenset[str] = frozenset()
        self.models = {"m": ModelSpec("m", "chat", 8192, 4096, 256), "e": ModelSpec("e", "embedding", 512, 1, 1)}

    async def current(self):
        self.calls.append("catalogue")
        return self.models


class FakeQuotas:
    def __init__(self, calls: Calls, refuse: bool = False) -> None:
        self.calls, self.refuse = calls, refuse

    async def check(self, org_id: str, env_id: str, quotas: Quotas) -> None:
        self.calls.append("quotas")
        if self.refuse:
            raise errors.quota_exceeded("environment", "daily")


class FakeCaps:
    def __init__(self, calls: Calls, refuse: bool = False, holds: bool = True) -> None:
        self.calls, self.refuse, self.holds = calls, refuse, holds
        self.released: list[str] = []

    async def reserve(self, org_id, cap, model, region, request_id, prompt_tokens, completion_tokens) -> bool:
        self.calls.append("caps")
        if self.refuse:
            raise errors.billing_cap_reached()
        return self.holds and cap is not None

    async def release(self, org_id: str, request_id: str) -> None:
        self.calls.append("release")
        self.released.append(request_id)


class FakeGate:
    def __init__(self, calls: Calls, answer: Decision | Exception = ADMITTED) -> None:
        self.calls, self.answer = calls, answer
        self.asked: list[tuple] = []

    async def admit(self, org, env, key, region, request_id, reserve, limits, platform) -> Decision:
        self.calls.append("gate")
        self.asked.append((org, env, key, region, request_id, reserve))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def authorizer(view: TenantView | None = VIEW, *, quotas: FakeQuotas | None = None, caps: FakeCaps | None = None,
               gate: FakeGate | None = None, calls: Calls | None = None) -> tuple[Authorizer, Calls]:
    calls = calls if calls is not None else Calls()
    views = {hash_api_key(SECRET, KEY): view} if view is not None else {}
    return Authorizer(FakeViews(calls, views), FakeCatalogue(calls), SECRET, "ap-south",
                      quotas or FakeQuotas(calls), caps or FakeCaps(calls), gate or FakeGate(calls)), calls


def headers(**extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}", "x-request-id": "req-1", "content-type": "application/json",
            "host": "gw", ":path": "/v1/chat/completions", **extra}


async def refusal(auth: Authorizer, body: bytes = CHAT, path: str = "/v1/chat/completions",
                  hdrs: dict[str, str] | None = None) -> errors.ClientError:
    with pytest.raises(errors.ClientError) as refused:
        await auth.decide("POST", path, headers() if hdrs is None else hdrs, body)
    return refused.value


@pytest.mark.parametrize("value", [None, "", "Basic abc", "Bearer ", "bearer"])
async def test_no_bearer_key_is_401_asking_for_one_before_any_lookup(value):
    auth, calls = authorizer()
    hdrs = headers()
    if value is None:
        del hdrs["authorization"]
    else:
        hdrs["authorization"] = value
    error = await refusal(auth, hdrs=hdrs)
    assert error.status == 401 and "didn't provide an API key" in error.message and calls == []


async def test_a_malformed_key_is_401_without_a_lookup_and_an_unknown_one_after_it():
    auth, calls = authorizer()
    error = await refusal(auth, hdrs=headers(authorization="Bearer sk-not-ours"))
    assert (error.status, error.code, calls) == (401, "invalid_api_key", [])
    error = await refusal(auth, hdrs=headers(authorization=f"Bearer {generate_api_key()}"))
    assert (error.status, error.code, calls) == (401, "invalid_api_key", ["view"])


@pytest.mark.parametrize(("statuses", "status", "words"), [
    (("suspended", "suspended", "suspended"), 403, "organization"),  # the widest level is named
    (("active", "suspended", "suspended"), 403, "environment"),
    (("active", "active", "suspended"), 403, "API key"),
    (("active", "active", "revoked"), 401, None),
    (("suspended", "active", "revoked"), 403, "organization"),
])
async def test_suspension_is_403_naming_the_level_and_a_revoked_key_401(statuses, status, words):
    org, env, key = statuses
    auth, calls = authorizer(replace(VIEW, org_status=org, env_status=env, key_status=key))
    error = await refusal(auth)
    assert error.status == status and calls == ["view"]  # nothing else was asked
    assert error.code == ("tenant_suspended" if status == 403 else "invalid_api_key")
    if words:
        assert words in error.message


async def test_a_key_past_its_expiry_is_401_and_before_it_is_served():
    """Expiry (and a rotation's overlap) is decided by the clock against the cached view: no NOTIFY needed."""
    now = [1_000.0]
    auth, calls = authorizer(replace(VIEW, key_expires_at=1_000.5))
    auth.wall_clock = lambda: now[0]
    assert (await auth.decide("GET", "/v1/models", headers(), b"")).headers
    now[0] = 1_000.5
    error = await refusal(auth)
    assert (error.status, error.code) == (401, "invalid_api_key") and calls[-1] == "view"


async def test_an_allowed_request_checks_in_order_and_carries_identity_route_and_limits():
    auth, calls = authorizer(replace(VIEW, cap=Cap(10_000, False, 0, False, None)))  # type: ignore[arg-type]
    allowed = await auth.decide("POST", "/v1/chat/completions",
                                headers(**{"x-clp-org": "spoofed", "cookie": "c", "accept": "*/*"}), CHAT)
    assert calls == ["view", "catalogue", "quotas", "platform", "caps", "gate"]
    assert allowed.headers == {Header.ORG: "o1", Header.ENV: "e1", Header.KEY: "k1", Header.MODEL: "m",
                               Header.REGION: "eu-central", Header.ROUTE: "eu-central/m", Header.USAGE_MODE: "json"}
    assert set(allowed.remove) == {"authorization", "cookie"}  # x-clp-org is overwritten, framing kept
    assert allowed.metadata[AuthzMeta.RESERVE] == str(allowed.metadata[AuthzMeta.PROMPT_ESTIMATE] + 5)
    assert AuthzMeta.LEASE not in allowed.metadata
    assert allowed.response_headers["x-ratelimit-remaining-requests"] == "9"
    gate = auth.gate
    assert gate.asked == [("o1", "e1", "k1", "eu-central", "req-1", int(allowed.metadata[AuthzMeta.RESERVE]))]


async def test_a_lease_taken_is_named_for_the_release_and_a_reserved_org_routes_to_its_lane():
    calls = Calls()
    auth, _ = authorizer(replace(VIEW, region=None),
                         gate=FakeGate(calls, Decision(admitted=True, leases=1, release_early=True)), calls=calls)
    auth.catalogue.reserved_orgs = frozenset({"o1"})
    allowed = await auth.decide("POST", "/v1/chat/completions", headers(), CHAT)
    assert allowed.metadata[AuthzMeta.LEASE] == "req-1"
    assert allowed.headers[Header.ROUTE] == "ap-south/m@o1"  # no region anywhere: the default


async def test_a_lease_far_from_its_limit_is_left_to_settlement():
    calls = Calls()
    auth, _ = authorizer(gate=FakeGate(calls, Decision(admitted=True, leases=2, release_early=False)), calls=calls)
    allowed = await auth.decide("POST", "/v1/chat/completions", headers(), CHAT)
    assert AuthzMeta.LEASE not in allowed.metadata  # no release call for this response


async def test_other_requests_are_allowed_with_the_identity_only():
    auth, calls = authorizer()
    allowed = await auth.decide("GET", "/v1/models", headers(), b"")
    assert calls == ["view"]
    assert set(allowed.headers) == {Header.ORG, Header.ENV, Header.KEY} and allowed.response_headers == {}


async def test_an_invalid_body_or_a_model_the_env_may_not_use_stops_before_quotas_and_reservations():
    auth, calls = authorizer(replace(VIEW, allowed_models=frozenset({"other"})))
    error = await refusal(auth, body=b"{")
    assert error.status == 400 and calls == ["view", "catalogue"]
    calls.clear()
    error = await refusal(auth)
    assert (error.status, error.code) == (404, "model_not_found") and calls == ["view", "catalogue"]


async def test_the_environments_per_request_caps_come_before_the_quota_counters():
    auth, calls = authorizer(replace(VIEW, quotas=Quotas(max_request_bytes=10)))
    assert (await refusal(auth)).status == 413 and "quotas" not in calls
    auth, calls = authorizer(replace(VIEW, quotas=Quotas(max_tokens_per_request=4)))
    error = await refusal(auth)  # max_tokens 5 x n 1 > 4
    assert (error.status, error.param) == (400, "max_tokens") and "quotas" not in calls


async def test_a_used_up_quota_is_403_and_nothing_is_reserved():
    calls = Calls()
    auth, _ = authorizer(quotas=FakeQuotas(calls, refuse=True), calls=calls)
    error = await refusal(auth)
    assert (error.status, error.code) == (403, "quota_exceeded")
    assert calls == ["view", "catalogue", "quotas"]


async def test_a_reached_bill_cap_is_403_before_the_token_reservation():
    calls = Calls()
    auth, _ = authorizer(caps=FakeCaps(calls, refuse=True), calls=calls)
    error = await refusal(auth)
    assert (error.status, error.code) == (403, "billing_cap_reached")
    assert calls[-1] == "caps" and "gate" not in calls


async def test_without_a_request_id_nothing_is_reserved_and_the_answer_is_503():
    auth, calls = authorizer()
    hdrs = headers()
    del hdrs["x-request-id"]
    assert (await refusal(auth, hdrs=hdrs)).status == 503
    assert "caps" not in calls and "gate" not in calls


async def test_a_rate_limit_refusal_is_429_with_headers_and_metadata_and_gives_the_money_back():
    calls = Calls()
    refused = Decision(admitted=False, retry_after_ms=1500, layer="key", kind="tokens_per_min")
    caps = FakeCaps(calls)
    auth, _ = authorizer(replace(VIEW, cap=Cap(10_000, False, 0, False, None)), caps=caps,  # type: ignore[arg-type]
                         gate=FakeGate(calls, refused), calls=calls)
    with pytest.raises(Refused) as answer:
        await auth.decide("POST", "/v1/chat/completions", headers(), CHAT)
    assert (answer.value.error.status, answer.value.error.code) == (429, "rate_limit_exceeded")
    assert answer.value.headers["retry-after"] == "2" and answer.value.metadata[AuthzMeta.ORG_ID] == "o1"
    assert calls[-2:] == ["gate", "release"] and caps.released == ["req-1"]


async def test_a_limiter_that_cannot_decide_is_503_and_an_uncapped_org_has_nothing_to_give_back():
    calls = Calls()
    caps = FakeCaps(calls)
    auth, _ = authorizer(caps=caps, gate=FakeGate(calls, LimiterUnavailable()), calls=calls)
    with pytest.raises(Refused) as answer:
        await auth.decide("POST", "/v1/chat/completions", headers(), CHAT)
    assert answer.value.error.status == 503 and answer.value.metadata[AuthzMeta.KEY_ID] == "k1"
    assert caps.released == []  # the cap held nothing for an org without one


async def test_without_a_gate_admission_is_left_to_the_rate_limit_service():
    calls = Calls()
    auth = Authorizer(FakeViews(calls, {hash_api_key(SECRET, KEY): VIEW}), FakeCatalogue(calls), SECRET,
                      "ap-south", FakeQuotas(calls), FakeCaps(calls), None)
    allowed = await auth.decide("POST", "/v1/chat/completions", headers(), CHAT)
    assert calls == ["view", "catalogue", "quotas", "caps"] and allowed.response_headers == {}
    assert AuthzMeta.RESERVE in allowed.metadata  # what Envoy's descriptor carries to `serve ratelimit`
